"""``python -m llmbatch.testing``: run the provider simulator (see ``--help``)."""

from llmbatch.testing._cli import serve_sim

if __name__ == "__main__":
    serve_sim(prog_name="python -m llmbatch.testing")
