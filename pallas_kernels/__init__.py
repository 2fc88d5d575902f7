"""Pallas GPU kernels (Triton backend), proven on CPU in interpret mode.

Kernels:
  flash_attention   FlashAttention-2 forward + backward (causal, segment ids, GQA/MQA, any length, sliding
                    windows, soft-caps, chunks, attention sinks with their gradient).
  decode_attention  flash-decoding: a few new queries against a KV cache with per-sequence lengths.
  paged_attention   paged_decode_attention: the same over a paged KV cache (a page pool shared by all
                    sequences, one page table per sequence; vLLM's PagedAttention layout).
  latent_decode_attention  flash-decoding for multi-head latent attention (DeepSeek-V2/V3 MLA) in its
                    absorbed form: all heads' queries against one shared latent + rope-key cache.

For GPUs that are not here (docs/gpu.md):
  targets           GPU targets as data (H100, H200, A100): compile-only devices, compiling_for, cubins.
  tuning            default block sizes per target, dtype and head dim (measured), checked before compiling.

Where the kernels run
  On an NVIDIA GPU every kernel compiles through Pallas' Triton backend. Anywhere else there is
  nothing to compile for, so a call raises `PallasUnavailableError` naming the fix. On CPU a
  kernel runs in Pallas interpret mode (slow, exact, for tests) only when asked, in one of two
  equivalent ways:
    * per call:        flash_attention(..., interpret=True)
    * process-wide:    JAXFORMER_PALLAS_INTERPRET=1  (also reaches calls you do not make yourself,
                       e.g. a DecoderLM built with attention_impl="pallas")
  The variable is read when a kernel is traced, so set it before the first call.
"""

from pallas_kernels.common import INTERPRET_ENV, PallasUnavailableError, resolve_interpret

__all__ = ["INTERPRET_ENV", "PallasUnavailableError", "resolve_interpret"]
