# Issue 4 (GPU) and issue 6's ORT target: ONNX Runtime CUDA (C's OrtRunner, IO binding) vs torch, fp16,
# LLaMA-1B shape, memory weights scaled to std 1e-3 (finite, well-conditioned; see docs/performance.md).
# Needs onnxruntime-gpu assembled into /tmp/site first (../shared/gpu/stage-wheels.sh chunks).
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())" 2>&1 | tee $OUT/ort.log
python -m runtimes.main bench --synthetic llama-1b --device cuda --precision fp16 --mem-std 0.001 --backends torch,ort --schedules diagonal --lengths 32768,131072 --lm-head --repeats 3 --export-to /tmp/armt-export-fp16 --parity-length 32768 --output $OUT/ort_fp16.json 2>&1 | tee -a $OUT/ort.log
# parity where the random memory is still conditioned (8 segments), and ORT's per-op profile of one steady step
python -m runtimes.main bench --synthetic llama-1b --device cuda --precision fp16 --mem-std 0.001 --backends torch,ort --schedules diagonal --lengths 8192 --lm-head --repeats 3 --export-dir /tmp/armt-export-fp16 --parity-length 8192 --output $OUT/ort_fp16_parity8192.json 2>&1 | tee -a $OUT/ort.log
python -m runtimes.bench.ort_profile /tmp/armt-export-fp16 --device cuda --out $OUT 2>&1 | tee -a $OUT/ort.log
