"""Plot the demo's loss curve (first run and resumed run) to a PNG."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(log_path: str, png_path: str) -> None:
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{log_path} holds no losses; did training run?")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for resumed, label, color in (
        (False, "first run", "tab:blue"),
        (True, "resumed in new processes", "tab:orange"),
    ):
        pts = [(r["step"], r["loss"]) for r in rows if r["resumed"] == resumed]
        if pts:
            ax.plot(*zip(*pts), label=label, color=color, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rank 0 training loss (cross-entropy, nats/char)")
    ax.set_title("Character GPT on the project's docs: 2 ranks, ZeRO-3")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    first, last = rows[0]["loss"], rows[-1]["loss"]
    print(
        f"rank0 loss {first:.3f} -> {last:.3f} over {rows[-1]['step']} steps; curve written to {png_path}"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
