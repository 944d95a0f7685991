# Issue 4 parity at 8,192 tokens (random memory still conditioned) and ORT's per-op profile of one steady step.
# Needs onnxruntime-gpu in /tmp/site; exports the model if this machine has no export yet.
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
E=/tmp/armt-export-fp16
if [ -f $E/manifest.json ]; then SRC="--export-dir $E"; else SRC="--export-to $E"; fi
python -m runtimes.main bench --synthetic llama-1b --device cuda --precision fp16 --mem-std 0.001 --backends torch,ort --schedules diagonal --lengths 8192 --lm-head --repeats 3 $SRC --parity-length 8192 --output $OUT/ort_fp16_parity8192.json 2>&1 | tee $OUT/ort_parity.log
python -m runtimes.bench.ort_profile $E --device cuda --out $OUT 2>&1 | tee -a $OUT/ort_parity.log
# v4 of the fast executor (o-projection's residual add in place): ablation + the 131,072-token diagonal row
python -m runtimes.bench.ablation --tokens 32768 --out $OUT 2>&1 | grep -v Warn | tee $OUT/v4_ablation.log
python -m runtimes.main bench --synthetic llama-1b --device cuda --precision bf16 --backends torch --schedules sequential,diagonal --lengths 131072 --output $OUT/v4_bench_131k.json 2>&1 | tail -4 | tee -a $OUT/v4_ablation.log
