"""A corpus of real architectures: model families built from ``transformers`` configs with random weights
(nothing downloaded), tiny for a CPU, plus torch.nn transformers and RNN language models.

Each entry is ``(name, factory)``; a factory returns ``(model, inputs, kwargs for gm.check)``. Sizes are
small (hidden 32-64, 2-4 blocks, sequences of 16) but the structure is each family's own: its blocks,
norm placement, activations, LayerScale, embeddings, heads.
"""

from __future__ import annotations

import torch
from torch import nn

V, T, B = 128, 16, 4  # vocabulary, sequence length, batch


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _images(size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _lm(tr, config_cls, model_cls, **config):
    def build():
        torch.manual_seed(0)
        model = getattr(tr, model_cls)(getattr(tr, config_cls)(**config))
        ids = _ids()
        return model, {"input_ids": ids, "labels": ids}, {}
    return build


def _tiny_text(layers: int = 4, **extra) -> dict:
    return dict(vocab_size=V, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
                max_position_embeddings=64, **extra)


HF_NAMES = ("gpt2", "llama", "mistral", "qwen2", "gpt_neox (pythia)", "opt", "bert", "roberta", "distilbert", "bart",
            "t5", "vit", "deit", "swin", "resnet (bottleneck)", "convnext (layerscale 1e-6)", "mobilenet_v2",
            "efficientnet", "mamba")
# transformers' EfficientNet init draws BatchNorm gammas from N(0, 0.02) like a Linear's weights, so each
# block scales its signal by ~1e-5 and the gradient vanishes: a real pathology of that random init
# (tests/test_corpus.py checks it against torch.autograd), not a false alarm
SICK_AT_INIT = ("efficientnet",)


def hf_families() -> list[tuple[str, object]]:
    import transformers as tr

    text = _tiny_text()
    families = [
        ("gpt2", _lm(tr, "GPT2Config", "GPT2LMHeadModel", vocab_size=V, n_embd=64, n_layer=4, n_head=4,
                     n_positions=64)),
        ("llama", _lm(tr, "LlamaConfig", "LlamaForCausalLM", **text, num_key_value_heads=2)),
        ("mistral", _lm(tr, "MistralConfig", "MistralForCausalLM", **text, num_key_value_heads=2)),
        ("qwen2", _lm(tr, "Qwen2Config", "Qwen2ForCausalLM", **text, num_key_value_heads=2)),
        ("gpt_neox (pythia)", _lm(tr, "GPTNeoXConfig", "GPTNeoXForCausalLM", **text)),
        ("opt", _lm(tr, "OPTConfig", "OPTForCausalLM", vocab_size=V, hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64)),
        ("bert", _cls(tr, "BertConfig", "BertForSequenceClassification", **text)),
        ("roberta", _cls(tr, "RobertaConfig", "RobertaForSequenceClassification", **text, pad_token_id=1)),
        ("distilbert", _cls(tr, "DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=V, dim=64,
                            n_layers=4, n_heads=4, hidden_dim=128, max_position_embeddings=64)),
        ("bart", _seq2seq(tr, "BartConfig", "BartForConditionalGeneration", vocab_size=V, d_model=64,
                          encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                          encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)),
        ("t5", _seq2seq(tr, "T5Config", "T5ForConditionalGeneration", vocab_size=V, d_model=64, d_kv=16, d_ff=128,
                        num_layers=2, num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)),
        ("vit", _vision(tr, "ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8, hidden_size=64,
                        num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, num_labels=10)),
        ("deit", _vision(tr, "DeiTConfig", "DeiTForImageClassification", image_size=32, patch_size=8,
                         hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                         num_labels=10)),
        ("swin", _vision(tr, "SwinConfig", "SwinForImageClassification", image_size=32, patch_size=4, embed_dim=16,
                         depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=10)),
        ("resnet (bottleneck)", _vision(tr, "ResNetConfig", "ResNetForImageClassification", embedding_size=16,
                                        hidden_sizes=[16, 32, 64], depths=[2, 2, 2], layer_type="bottleneck",
                                        num_labels=10)),
        ("convnext (layerscale 1e-6)", _vision(tr, "ConvNextConfig", "ConvNextForImageClassification",
                                               num_stages=2, hidden_sizes=[16, 32], depths=[2, 2], num_labels=10)),
        ("mobilenet_v2", _vision(tr, "MobileNetV2Config", "MobileNetV2ForImageClassification", image_size=32,
                                 depth_multiplier=0.35, num_labels=10)),
        ("efficientnet", _vision(tr, "EfficientNetConfig", "EfficientNetForImageClassification", image_size=32,
                                 width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                                 num_labels=10)),
        ("mamba", _lm(tr, "MambaConfig", "MambaForCausalLM", vocab_size=V, hidden_size=32, state_size=8,
                      num_hidden_layers=4, expand=2, conv_kernel=4)),
    ]
    assert tuple(n for n, _ in families) == HF_NAMES
    return families


def _cls(tr, config_cls, model_cls, **config):
    def build():
        torch.manual_seed(0)
        model = getattr(tr, model_cls)(getattr(tr, config_cls)(**config))
        return model, {"input_ids": _ids(), "labels": torch.tensor([0, 1, 0, 1])}, {}
    return build


def _seq2seq(tr, config_cls, model_cls, **config):
    def build():
        torch.manual_seed(0)
        model = getattr(tr, model_cls)(getattr(tr, config_cls)(**config))
        return model, {"input_ids": _ids(), "labels": _ids(1)}, {}
    return build


def _vision(tr, config_cls, model_cls, **config):
    def build():
        torch.manual_seed(0)
        model = getattr(tr, model_cls)(getattr(tr, config_cls)(**config))
        return model, {"pixel_values": _images(), "labels": torch.tensor([0, 3, 5, 9])}, {}
    return build


def hf_one_block_families() -> list[tuple[str, object]]:
    """Families with a single block (or one per stack): a one-layer model has no stream to profile, and its
    block's branch is scaled by design as in a deep one (small q/k gradients at init, an embedding LayerNorm
    dividing by the 0.02-scale embeddings), so it must read as healthy as the deep ones do."""
    import transformers as tr

    text = _tiny_text(layers=1)
    return [
        ("bert, 1 layer", _cls(tr, "BertConfig", "BertForSequenceClassification", **text)),
        ("bert masked LM, 1 layer, hidden 32", _lm(tr, "BertConfig", "BertForMaskedLM",
                                                   **dict(text, hidden_size=32, num_attention_heads=2))),
        ("roberta, 1 layer", _cls(tr, "RobertaConfig", "RobertaForSequenceClassification", **text, pad_token_id=1)),
        ("gpt2, 1 layer", _lm(tr, "GPT2Config", "GPT2LMHeadModel", vocab_size=V, n_embd=64, n_layer=1, n_head=4,
                              n_positions=64)),
        ("llama, 1 layer", _lm(tr, "LlamaConfig", "LlamaForCausalLM", **text, num_key_value_heads=2)),
        ("distilbert, 1 layer", _cls(tr, "DistilBertConfig", "DistilBertForSequenceClassification", vocab_size=V,
                                     dim=64, n_layers=1, n_heads=4, hidden_dim=128, max_position_embeddings=64)),
        ("t5, 1 layer each", _seq2seq(tr, "T5Config", "T5ForConditionalGeneration", vocab_size=V, d_model=64, d_kv=16,
                                      d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4,
                                      decoder_start_token_id=0)),
        ("vit, 1 layer", _vision(tr, "ViTConfig", "ViTForImageClassification", image_size=32, patch_size=8,
                                 hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                 num_labels=10)),
    ]


# --- torch.nn -----------------------------------------------------------------------------------------
class TokenLM(nn.Module):
    """Embedding -> torch.nn recurrent or transformer body -> vocabulary head, logits (B, T, V)."""

    def __init__(self, body: str, d: int = 64, layers: int = 2, norm_first: bool = True):
        super().__init__()
        self.embed = nn.Embedding(V, d)
        self.body_kind = body
        if body in ("lstm", "gru"):
            self.body = {"lstm": nn.LSTM, "gru": nn.GRU}[body](d, d, layers, batch_first=True)
        else:
            layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
            self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, V)

    def forward(self, ids):  # (B, T)
        h = self.embed(ids)  # (B, T, d)
        h = self.body(h)[0] if self.body_kind in ("lstm", "gru") else self.body(h)
        return self.head(h)  # (B, T, V)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every step."""
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def _torch_lm(body: str, **kwargs):
    def build():
        torch.manual_seed(0)
        return TokenLM(body, **kwargs), _ids(), {"targets": _ids(), "loss_fn": lm_loss}
    return build


def torch_encoder(norm_first: bool, targets: bool, layers: int = 6):
    def build():
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, norm_first=norm_first)
        model = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        x = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(0))
        return model, x, ({"targets": torch.randn(B, T, 64)} if targets else {})
    return build


def _torch_transformer(norm_first: bool, targets: bool, length: int = T):
    def build():
        torch.manual_seed(0)
        model = nn.Transformer(64, 4, 3, 3, 128, dropout=0.0, batch_first=True, norm_first=norm_first)
        gen = torch.Generator().manual_seed(0)
        src, tgt = torch.randn(B, length, 64, generator=gen), torch.randn(B, length, 64, generator=gen)
        return model, (src, tgt), ({"targets": torch.randn(B, length, 64, generator=gen)} if targets else {})
    return build


def torch_families() -> list[tuple[str, object]]:
    return [
        ("nn.TransformerEncoder post-LN", torch_encoder(False, False)),
        ("nn.TransformerEncoder post-LN, targets", torch_encoder(False, True)),
        ("nn.TransformerEncoder pre-LN", torch_encoder(True, False)),
        ("nn.TransformerEncoder pre-LN, targets", torch_encoder(True, True)),
        ("nn.Transformer post-LN", _torch_transformer(False, False)),
        ("nn.Transformer pre-LN", _torch_transformer(True, False)),
        ("nn.Transformer post-LN, targets, T=128", _torch_transformer(False, True, 128)),
        ("LSTM LM", _torch_lm("lstm")),
        ("GRU LM", _torch_lm("gru")),
        ("transformer LM (pre-LN)", _torch_lm("transformer")),
    ]
