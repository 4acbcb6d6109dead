"""Hugging Face interop: one module of names and layouts per model family, one reader, one writer.

  families.py      the registry: which family a model config or a config.json model_type belongs to
  mapping.py       `HFTensor`, the entry of a family's tensor mapping (both directions walk it)
  deepseek_v3.py   DeepSeek-V3 / V2: HF tensor names, expert (un)fusing, config.json mapping
  gpt_oss.py       gpt-oss: HF GptOss names, interleaved/transposed experts, MXFP4 keys, config.json mapping
  read.py          an HF directory -> our Transformer (`checkpoint.init_from_hf`)
  write.py         a moeforge checkpoint -> safetensors + config.json + tokenizer files
"""
