# The torch-backend measurements on the H100 (run from the repo root on the GPU machine; $OUT = result folder).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv > $OUT/ablation.log
# 1. optimisation variants side by side + kernel profile of one steady step (performance log)
python -m runtimes.bench.ablation --tokens 32768 --out $OUT 2>&1 | tee -a $OUT/ablation.log
# 2. parity: fast executor vs reference, fp32 (exact math) and bf16 (against the fp32 reference)
python -m runtimes.main bench --synthetic llama-1b --device cuda --precision fp32 --backends torch --schedules diagonal --lengths 4096 --repeats 1 --parity-length 4096 --output $OUT/parity_fp32.json 2>&1 | tail -12 | tee $OUT/parity.log
python -m runtimes.main bench --synthetic llama-1b --device cuda --precision bf16 --backends torch --schedules diagonal --lengths 4096 --repeats 1 --parity-length 2048 --output $OUT/parity_bf16.json 2>&1 | tail -12 | tee -a $OUT/parity.log
# 3. the results table
python -m runtimes.main bench --synthetic llama-1b --device cuda --precision bf16 --backends torch,torch-ref --lengths 4096,8192,16384,32768,65536,131072,1048576 --max-full 131072 --max-sequential 131072 --max-ref 32768 --output $OUT/bench_h100_bf16.json --plot $OUT/bench_h100_bf16.png 2>&1 | tee $OUT/bench.log
