"""Let Megatron-LM's local (no Transformer Engine) layer spec build a DeepSeek-style model:
multi-latent attention (MLA) and multi-token prediction (MTP) layers.

Two places in Megatron-LM d98e8a6 assume Transformer Engine is installed; both fail while the
model is built, before any computation:

- MLA: the local spec gives MLA the plain ``DotProductAttention`` as its core attention, but
  ``MultiLatentAttention`` builds it with ``k_channels=`` and ``v_channels=`` keywords that only
  ``TEDotProductAttention`` accepts (``TypeError: DotProductAttention.__init__() got an
  unexpected keyword argument 'k_channels'``). ``DotProductAttention.forward`` handles MLA's
  shapes as they are: query and key are reshaped with ``-1`` (head dim qk_head_dim +
  qk_pos_emb_head_dim), the value head dim is read from the value tensor, and MLA passes its
  own softmax scale. Only the output view uses ``kv_channels * heads / TP``, so ``kv_channels``
  must equal ``v_head_dim`` (checked here).
- MTP: ``MultiTokenPredictionLayer`` asks ``is_inference_column_parallel_linear(eh_proj)``,
  an ``isinstance`` against Transformer Engine subclasses that are not classes without it
  (``TypeError: isinstance() arg 2 must be a type``). Without Transformer Engine no layer is
  one of them, so the answer is False.

``build_without_transformer_engine()`` makes exactly these two changes; the computation is
Megatron's own. tools/megatron_deepseek_pretrain.py and tools/megatron_deepseek_logits.py call it
before building a model.
"""
import functools


def build_without_transformer_engine():
    _accept_mla_channels()
    _no_inference_linears()


def _accept_mla_channels():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if getattr(DotProductAttention.__init__, "accepts_mla_channels", False):
        return
    original = DotProductAttention.__init__

    @functools.wraps(original)
    def init(self, config, *args, k_channels=None, v_channels=None, **kwargs):
        if v_channels is not None and v_channels != config.kv_channels:
            raise ValueError(
                f"local DotProductAttention views its output as kv_channels ({config.kv_channels}) "
                f"per head; MLA's v_head_dim is {v_channels}: give --kv-channels {v_channels}")
        original(self, config, *args, **kwargs)

    init.accepts_mla_channels = True
    DotProductAttention.__init__ = init


def _no_inference_linears():
    from megatron.core.transformer import multi_token_prediction

    original = multi_token_prediction.is_inference_column_parallel_linear

    def is_inference_column_parallel_linear(module):
        try:
            return original(module)
        except TypeError:  # the Transformer Engine classes are placeholders without it
            return False

    multi_token_prediction.is_inference_column_parallel_linear = is_inference_column_parallel_linear
