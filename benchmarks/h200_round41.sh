# Prepared and run in the thirty-seventh session: the prefill (time to first token). Parts:
#   gemm      the 7B projections alone over rows: the tiled INT4 kernel, dequantization + cuBLAS, cuBLAS on a float16
#             weight (where runtime.kernels.w4.DEQUANT_MIN_ROWS should sit)
#   prefill   7B and LLaMA-3-8B prefill of 2048 / 8192 / 32768 tokens: W4KV4 now, W4KV4 as before (--before), fp16
#             transformers, with each cell's top kernels
#   prefill2  (after the prefill's KV write became one kernel, kv4.quant_write) the W4KV4 cells of prefill again
#   decode    the decode step (7B b1 p2048, p32768) after the append's quantization took per-row stats offsets
#   check     the GPU tests of what changed: w4_linear / w4_dequantize, poq_attention, the prefill's write, the decode
#             step's tests and the real-shape tests (whose eager reference prefills on the new path)
#   verify    (next session) the GPU tests above and the decode step after _quant_store's divisions became div_rn
#             (89b2dc0, interpreter-tested only: the device time was spent)
# Usage: OUT=$OUT bash benchmarks/h200_round41.sh PART...  (carry .gpu/whl; .gpu/xdist for check)
source benchmarks/h200_lib.sh
for part in "$@"; do case $part in
gemm)
  python3 benchmarks/prefill_bench.py --gemm 64,128,256,512,1024,2048,8192,32768 --json "$o/gemm.json" 2>&1 \
    | grep -v Warning; mark gemm;;
prefill)
  python3 benchmarks/prefill_bench.py --shapes 7b,8b --prompts 2048,8192,32768 --profile --json "$o/prefill.json" \
    2>&1 | grep -v Warning; mark prefill
  python3 benchmarks/prefill_bench.py --shapes 7b,8b --prompts 2048,8192,32768 --paths wkvq --before --profile \
    --json "$o/prefill_before.json" 2>&1 | grep -v Warning; mark "prefill before";;
prefill2)
  python3 benchmarks/prefill_bench.py --shapes 7b,8b --prompts 2048,8192,32768 --paths wkvq --profile \
    --json "$o/prefill2.json" 2>&1 | grep -v Warning; mark prefill2;;
decode) nbench dec --shapes 7b --prompts 2048,32768; mark decode;;
check)
  python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_kernels.py tests/test_static_cache.py \
    tests/test_real_shapes.py > "$o/check.txt" 2>&1; echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)" "$o/check.txt" | head -30; tail -2 "$o/check.txt"; mark check;;
verify)
  python3 -m pytest -q -p no:cacheprovider -n 12 tests/test_kernels.py tests/test_kv4_mma.py tests/test_static_cache.py \
    tests/test_real_shapes.py > "$o/verify.txt" 2>&1; echo "pytest rc=$?"
  grep -E "^(FAILED|ERROR)" "$o/verify.txt" | head -30; tail -2 "$o/verify.txt"; mark verify
  nbench dec2 --shapes 7b --prompts 2048,32768; mark decode;;
*) echo "unknown part $part";;
esac; done
