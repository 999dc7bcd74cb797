"""Print the README's provider matrix, generated from the provider profiles.

    python scripts/provider_matrix.py

One row per built-in provider profile (:data:`llmbatch.config.BUILTIN_PROVIDERS`): whether
llmbatch reaches it online and through a Batch API, where its rate limits come from, and
the Batch API's discount. The README holds the output between the markers
``<!-- provider-matrix:start -->`` and ``<!-- provider-matrix:end -->``;
``tests/test_provider_matrix.py`` checks that the two agree.
"""

from __future__ import annotations

from llmbatch.config import BUILTIN_PROVIDERS, ProviderProfile

#: how each limits source reads in the table
_SOURCES = {
    "headers": "headers (limits and remaining)",
    "remaining headers": "headers (remaining; limits inferred)",
    "profile and 429s": "profile (lowered by 429s)",
    "profile": "profile",
}


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _row(profile: ProviderProfile) -> str:
    discount = f"{profile.batch_discount:.0%}" if profile.batch else "-"
    cells = [
        f"`{profile.name}`",
        _yes(profile.online),
        _yes(profile.batch),
        _SOURCES.get(profile.limits_source, profile.limits_source),
        discount,
    ]
    return "| " + " | ".join(cells) + " |"


def render() -> str:
    """The Markdown table, one line per row, ending with a newline."""
    lines = [
        "| provider | online | batch | limits source | batch discount |",
        "| --- | --- | --- | --- | ---: |",
        *(_row(profile) for profile in BUILTIN_PROVIDERS.values()),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print the table."""
    print(render(), end="")


if __name__ == "__main__":
    main()
