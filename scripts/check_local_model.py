"""Exit 0 when the embedded local model answers one token; non-zero otherwise.

scripts/install runs it to detect a llama-cpp-python built for another CPU, which dies
with SIGILL at the first inference (the parent sees a negative exit code).
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
from llama_cpp import Llama
from llmbatch.providers.local import default_model_path
llm = Llama(model_path=str(default_model_path()), n_ctx=256, verbose=False)
llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=1)
"""


def main() -> int:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        print(f"local model check failed: {reason[0]}", file=sys.stderr)
    return 0 if done.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
