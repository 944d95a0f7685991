# Conditioning sweep of the random memory (recorded in results/h100/v2_parity.log).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# 4. conditioning of the random memory: fp16 vs the fp32 reference at 8192 tokens, for several memory-weight scales
for s in 0.1 0.02 0.005 0.001; do echo "== mem-std $s"; python -m runtimes.main bench --synthetic llama-1b --device cuda --precision fp16 --backends torch --schedules diagonal --lengths 1024 --repeats 1 --warmup 0 --mem-std $s --parity-length 8192 2>&1 | tail -9; done 2>&1 | tee -a $OUT/parity.log
