"""PNG plots of the comparison table (matplotlib, from the ``eval`` extra) and KV-cache sizes.

:func:`kv_cache_bytes` is plain arithmetic (no matplotlib): the bytes a cache holds for
``context`` tokens. Full precision: K and V, ``2`` bytes per channel. Quantized (the runtime's
cache): per token, per KV head, ``ceil(head_dim * bits / 8)`` bytes of packed codes plus a
float16 step and minimum per group, for K and V, plus the static ``s``/``delta`` (float32) once
per layer (the POQ current token is transient and not counted).
"""

from __future__ import annotations

import math
from pathlib import Path

FP_BYTES = 2  # float16 / bfloat16
STATS_BYTES = 2  # the runtime cache stores each token's step and minimum in float16
STATIC_BYTES = 4  # s and delta are float32


def require_matplotlib() -> None:
    """Raise a clear error if matplotlib is missing (plots are optional)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plots needs matplotlib: pip install 'wkvquant[eval]'") from None


def kv_cache_bytes(shape: dict, context: int, bits: int | None = None, group_size: int | None = None) -> int:
    """Bytes of the KV cache of ``context`` tokens for ``shape`` (``num_layers``, ``num_kv_heads``,
    ``head_dim``); ``bits=None`` is the full-precision cache. ``group_size`` defaults to head_dim."""
    layers, heads, d = shape["num_layers"], shape["num_kv_heads"], shape["head_dim"]
    if bits is None:
        return 2 * layers * heads * d * FP_BYTES * context
    groups = math.ceil(d / (group_size or d))
    per_token = math.ceil(d * bits / 8) + 2 * groups * STATS_BYTES
    static = 4 * heads * d * STATIC_BYTES  # k/v scale and shift
    return layers * (2 * heads * per_token * context + static)


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def ppl_chart(table: dict, path: Path) -> Path:
    """Perplexity per configuration as a dot plot (the axis need not start at 0, so small gaps show);
    the first row (full precision) is drawn as a dashed reference line. Rows without a number are left out."""
    plt = _pyplot()
    rows = [r for r in table["rows"] if r["ppl"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.6))
    labels = [r["label"] + (" *" if r["kind"] == "peer" else "") for r in rows][::-1]
    values = [r["ppl"] for r in rows][::-1]
    ax.hlines(labels, min(values), values, color="#c8d3e6", linewidth=2)
    ax.plot(values, labels, "o", color="#4c72b0")
    for v, lab in zip(values, labels):
        ax.annotate(f"{v:.3f}", (v, lab), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.axvline(rows[0]["ppl"], color="gray", linestyle="--", linewidth=1)
    span = max(values) - min(values) or max(values) * 0.05
    ax.set_xlim(min(values) - 0.1 * span, max(values) + 0.25 * span)
    ax.set_xlabel(f"perplexity ({table['data']}, {table['windows']} x {table['seqlen']} tokens, "
                  f"{table['kv_mode_label']})", fontsize=8)
    peer = " (* token by token, first windows only)" if any(r["kind"] == "peer" for r in rows) else ""
    ax.set_title(f"{table['source']}: perplexity per configuration{peer}", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def kv_bytes_chart(shape: dict, path: Path, bits: int = 4, max_context: int | None = None) -> Path:
    """KV-cache MiB vs context length, full precision (fp16) vs ``bits``-bit."""
    plt = _pyplot()
    top = max_context or max(shape.get("max_position_embeddings") or 8192, 1024)
    contexts = [2 ** i for i in range(7, int(math.log2(top)) + 1)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, b in (("fp16", None), (f"KV{bits} (POQ)", bits)):
        ax.plot(contexts, [kv_cache_bytes(shape, c, b) / 2 ** 20 for c in contexts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache (MiB, batch 1)")
    ratio = kv_cache_bytes(shape, contexts[-1], bits) / kv_cache_bytes(shape, contexts[-1])
    ax.set_title(f"KV-cache size vs context length (KV{bits} = {ratio:.1%} of fp16 at {contexts[-1]} tokens)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
