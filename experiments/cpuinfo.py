"""The CPU line the benchmarks print beside their tables."""

import platform


def cpu_description():
  """The CPU model and the ISA extensions that decide matmul speed (AVX-512, its BF16 dot, AMX)."""
  model, flags = platform.processor() or "unknown CPU", set()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          model = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
          break
  except OSError:
    pass
  wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_fp16")
  return f"CPU {model} [{' '.join(f for f in wanted if f in flags) or 'no AVX2'}]"
