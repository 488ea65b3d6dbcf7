#!/bin/sh
# Every benchmark recorded in docs/BENCHMARKS.md, one after the other on one torch thread, each writing its markdown
# into one folder (default: benchmark-results/), with the machine's load before and after.
#   sh benchmarks/run_all.sh [OUTPUT_FOLDER]
set -e
out=${1:-benchmark-results}
mkdir -p "$out"
{ date -u; echo "$(nproc --all) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"; uptime; } > "$out/machine.txt"
export OMP_NUM_THREADS=1
python benchmarks/compare_native.py --threads 1 --output "$out/compare_native.md"
python benchmarks/sst2_padding_free.py --threads 1 --output "$out/sst2_padding_free.md"
python benchmarks/profile_generation.py --threads 1 --output "$out/profile_generation.md"
python benchmarks/compare_peers.py --threads 1 --repeats 7 --output "$out/compare_peers.md"  # skips peers not installed
python benchmarks/train_loop.py --threads 1 --output "$out/train_loop.md"
uptime >> "$out/machine.txt"
