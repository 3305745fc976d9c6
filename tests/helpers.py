"""Shared test helpers: tiny random LLaMA models with a real (tiny) tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps weights and the key value cache to four bits.",
    "Past only quantization keeps the current token in full precision.",
    "Anarchism is a political philosophy and movement that is skeptical of authority.",
] * 20


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_config(**overrides) -> LlamaConfig:
    """2 layers, hidden 160 (ragged with group 128), GQA 4:2 heads of 40 channels, tied embeddings."""
    kw = dict(vocab_size=320, hidden_size=160, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def make_tiny_llama(path: Path, seed: int = 0, half_exact: bool = False, **overrides) -> Path:
    """A tiny random LLaMA saved (float32) with its tokenizer; ``half_exact``: every weight a float16 value, as in a
    float16 checkpoint."""
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-init weights so the model is not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            if half_exact:
                p.copy_(p.half().float())
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def kernel_rtn_artifact(tmp_path: Path, layers: int = 1) -> Path:
    """A tiny model whose shapes the decode kernels take (hidden 256, 4 heads of 64, 2 KV heads, MLP 320: the down
    projection has a ragged group) with ``layers`` layers, converted with RTN into ``tmp_path / "q"``."""
    from converter.convert import ConvertConfig, convert

    src = make_tiny_llama(tmp_path / "m", hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=320, num_hidden_layers=layers)
    return convert(ConvertConfig(out=tmp_path / "q", model=str(src), method="rtn", device="cpu", dtype="float32"))


def heads128_rtn_artifact(tmp_path: Path, heads: int = 4, kv_heads: int = 2) -> Path:
    """A two-layer tiny model with heads of 128 channels (the tensor-core attention; by default hidden 512, 2 query
    heads a KV head; hidden ``128 heads``), MLP 640 (the down projection has five groups), converted with RTN into
    ``tmp_path / "q"``."""
    from converter.convert import ConvertConfig, convert

    src = make_tiny_llama(tmp_path / "m", hidden_size=128 * heads, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, intermediate_size=640, num_hidden_layers=2)
    return convert(ConvertConfig(out=tmp_path / "q", model=str(src), method="rtn", device="cpu", dtype="float32"))


def fast_copy(model, projections: str | None = "gemv", use_kernels: bool = True):
    """A ``FastLlama`` sharing ``model``'s weights (its layers copied, so that ``with_projections`` leaves
    ``model``'s alone) on the kernels, or with ``use_kernels=False`` the eager path, on ``projections`` where given
    ("triton" takes a kernel model's weights back to plain ones)."""
    import dataclasses

    from runtime.fast import FastLlama

    fast = FastLlama(model.config, model.embed, [dataclasses.replace(la) for la in model.layers], model.norm,
                     model.lm_head, model.cos, model.sin, use_kernels)
    return fast.with_projections(projections) if projections else fast


def fast_decode_errors(tmp_path: Path, projections: str):
    """A one-layer tiny model (hidden 256, MLP 320: the down projection has a ragged group) converted with RTN,
    loaded on CUDA in float16, its decode step on ``projections`` against the eager path: returns the fast
    model and the relative errors of the logits of one ``decode_step`` and two CUDA-graph steps."""
    import runtime
    from runtime.fast import DecodeGraph, FastLlama

    model, _ = runtime.load(kernel_rtn_artifact(tmp_path), device="cuda", dtype=torch.float16)
    eager = FastLlama.from_hf(model, 32, use_kernels=False)
    fast = fast_copy(eager, projections)
    rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    ids = torch.randint(3, 300, (2, 8), device="cuda")
    ce, cf = eager.new_cache(2, 16), fast.new_cache(2, 16)
    eager.forward(ids[:, :5], ce), fast.forward(ids[:, :5], cf)
    errs = [rel(fast.decode_step(ids[:, 5], cf), eager.forward(ids[:, 5:6], ce))]
    graph = DecodeGraph(fast, cf)
    errs += [rel(graph.step(ids[:, i]), eager.forward(ids[:, i:i + 1], ce)) for i in (6, 7)]
    assert cf.length == 8
    return fast, errs


def real_shape_decode_errors(shape: str, batch: int, prompt: int, steps: int = 3, layers: int = 2,
                             lost: float = 0.0, seed: int = 0) -> list[float]:
    """A random W4KV4 model of ``wkvq bench``'s ``shape`` cut to ``layers`` layers, its 4-bit cache filled with
    ``prompt`` random tokens and sized as the benchmark sizes it (so that the decode step takes the GEMV and
    attention tables' entries for this shape, batch and context), on CUDA: the CUDA-graph decode step against the
    eager path on the same weights and a copy of the same cache. Returns the relative errors of the logits of
    ``steps`` steps of random tokens.

    The keys' steps are ten times the benchmark's, so that a query's scores spread by several units and a few
    tokens carry most of its attention: with the benchmark's flat scores every token's weight is about the same and
    the output is close to the mean of the values whatever tokens the kernel reads. ``lost`` > 0 redraws the key
    codes of that fraction of the past (its last tokens) in the eager path's copy only: the errors a kernel that
    lost or misplaced those tokens would show (the check's power). The weights, cache and tokens are drawn from
    ``seed``."""
    from converter.bench import llama_config
    from converter.bench_paths import wkvq_decode_graph

    config = llama_config(shape)
    config.num_hidden_layers = layers
    torch.manual_seed(seed)
    fast, cache, graph, _ = wkvq_decode_graph(config, batch, prompt, steps)
    for store in cache.layers:
        store.k_step.mul_(10)
    eager = fast_copy(fast, "triton", use_kernels=False)
    ref = eager.new_cache(batch, cache.max_len)
    copy_cache(ref, cache)
    if lost:
        for mine in ref.layers:
            mine.k_codes[:, :, prompt - int(lost * prompt):prompt].random_(0, 256)
    errs = []
    for _ in range(steps):
        ids = torch.randint(0, config.vocab_size, (batch,), device="cuda")
        errs.append(rel_error(graph.step(ids), eager.forward(ids[:, None], ref)))
    return errs


def copy_cache(dst, src) -> None:
    """Make the ``StaticPOQCache`` ``dst`` hold what ``src`` holds: every layer's codes and stats, the position and
    step counters and the length (not the ready flags: each step sets its own)."""
    for mine, theirs in zip(dst.layers, src.layers):
        for t, u in zip(mine.tensors(), theirs.tensors()):
            t.copy_(u)
    dst.counters.copy_(src.counters)
    dst.length = src.length


def load_benchmark(name: str, monkeypatch):
    """The script ``benchmarks/NAME.py`` as a module (its directory on ``sys.path`` for its own imports), for the
    duration of a test."""
    import importlib.util
    import sys

    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench_dir / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)
    spec.loader.exec_module(bench)
    return bench


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` (Frobenius norms) in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quantized_weight(n: int, k: int, group: int = 128, seed: int = 0, device="cpu"):
    """A random ``[n, k]`` weight quantized to 4 bits (round to nearest, asymmetric, ``group``): packed codes, float16
    scales, uint8 zeros, and the dequantized float64 matrix, on ``device``."""
    from runtime import quant

    g = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    scale, zero = quant.weight_qparams(w, 4, group)
    q = quant.quantize_weight(w, scale, zero, 4, group)
    s, z = scale.half(), zero.to(torch.uint8)
    ref = quant.dequantize_weight(q, s, z, group, torch.float64)
    return quant.pack(q, 4).to(device), s.to(device), z.to(device), ref.to(device)


def sm90_sass(fn, consts: dict, kinds: dict, default_kind: str, num_warps: int, tmp_path: Path,
              arch: int = 90, aligned: bool = False) -> tuple[str, str]:
    """Compile the Triton kernel ``fn`` for sm_90 (or sm_``arch``) without a GPU (Triton's bundled ptxas) and return
    its SASS and resource usage (Triton's bundled ``cuobjdump``). ``consts``: the constexpr arguments; ``kinds``: the
    other arguments' signature types (``default_kind`` for those not named). ``aligned``: every pointer specialised
    as 16-byte aligned, as a launch on tensors that are (most: torch allocates at 256 bytes) specialises it (wider
    loads; without, the build a launch on an unaligned view gets). Skips the test where this Triton lacks the tools or
    the compile API; a PTX error fails it."""
    import os
    import subprocess

    import pytest

    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("Triton's bundled cuobjdump is not there")
    names = list(fn.arg_names)
    sig = {n: "constexpr" if n in consts else kinds.get(n, default_kind) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")} if aligned else {}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    try:
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    except Exception as e:  # a Triton without this compile API: nothing to check here
        if "ptxas" in str(e).lower() or "PTX" in str(e) or type(e).__name__ == "CompilationError":
            raise  # the kernel's own error (a CompilationError hid a test's missing constexprs for a session)
        pytest.skip(f"this Triton cannot compile for sm_{arch} here: {type(e).__name__}: {str(e)[:120]}")
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(k.asm["cubin"])
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    usage = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    return sass, usage
