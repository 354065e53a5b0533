"""The auxiliary NADO model: `R(ctx, v) = sigmoid(r(ctx, v))` for every next token `v`, in one forward pass.

It reads the hidden states of the LM (it holds no copy of the LM's weights, so it fits beside a 4-bit 7B model) and
is a zero-initialised linear head, optionally over a few causal transformer layers of its own. Zero initialisation
gives `R = 0.5` everywhere, hence `q = p` and a zero regulariser before the first oracle phase.
"""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class NADOConfig(PretrainedConfig):
    r"""
    Configuration of a [`NADOModel`].

    Args:
        hidden_size (`int`, *optional*, defaults to `64`):
            Width of the LM hidden states the model reads.
        vocab_size (`int`, *optional*, defaults to `32000`):
            Number of next tokens scored; must equal the LM's logits dimension.
        num_layers (`int`, *optional*, defaults to `0`):
            Causal transformer layers between the hidden states and the head.
        num_attention_heads (`int` or `None`, *optional*):
            Heads of those layers. Defaults to `hidden_size // 64` (at least 1).
        intermediate_size (`int` or `None`, *optional*):
            Feed-forward width of those layers. Defaults to `4 * hidden_size`.
        hidden_state_layer (`int`, *optional*, defaults to `-1`):
            Index into the LM's `hidden_states` that this model reads.
        base_model_name_or_path (`str` or `None`, *optional*):
            The LM whose hidden states this model was trained on, for reference.
    """

    model_type = "cadet_nado"

    def __init__(
        self,
        hidden_size: int = 64,
        vocab_size: int = 32000,
        num_layers: int = 0,
        num_attention_heads: int | None = None,
        intermediate_size: int | None = None,
        hidden_state_layer: int = -1,
        base_model_name_or_path: str | None = None,
        **kwargs,
    ):
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads or max(1, hidden_size // 64)
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.hidden_state_layer = hidden_state_layer
        self.base_model_name_or_path = base_model_name_or_path
        super().__init__(**kwargs)


def _causal_padding_mask(attention_mask: torch.Tensor | None, length: int, num_heads: int, device, dtype):
    """Additive mask `[B * heads, L, L]`: causal, hiding padded keys, and always letting a token see itself (so a row
    of a padded query is never empty, which would give NaN)."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if attention_mask is None:
        allowed = causal[None]
    else:
        keys = attention_mask.bool()[:, None, :]
        allowed = causal[None] & (keys | torch.eye(length, dtype=torch.bool, device=device)[None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))
    return mask.repeat_interleave(num_heads, dim=0) if mask.shape[0] > 1 else mask[0]


class NADOModel(PreTrainedModel):
    r"""
    NADO model: R-logits for every next token from the LM's hidden states.

    `forward(hidden_states, attention_mask=None)` takes `[B, L, hidden_size]` states (causally aligned, as the LM's
    logits: position `t` scores the token at `t + 1`) and returns `[B, L, vocab_size]` logits `r` with
    `R = sigmoid(r)`.

    Example:

    ```python
    >>> outputs = lm(input_ids, output_hidden_states=True)
    >>> nado_logits = nado(outputs.hidden_states[nado.config.hidden_state_layer])
    ```
    """

    config_class = NADOConfig
    base_model_prefix = "nado"
    main_input_name = "hidden_states"
    _no_split_modules = []

    def __init__(self, config: NADOConfig):
        super().__init__(config)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=config.hidden_size,
                nhead=config.num_attention_heads,
                dim_feedforward=config.intermediate_size,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.num_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size) if config.num_layers > 0 else nn.Identity()
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        # The head starts at zero (R = 0.5, q = p); the extra layers keep torch's own initialisation
        if module is getattr(self, "head", None):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    @classmethod
    def from_lm(cls, lm: PreTrainedModel, num_layers: int = 0, hidden_state_layer: int = -1, **kwargs) -> "NADOModel":
        """A zero-initialised NADO model sized for `lm` (its hidden size and logits dimension)."""
        text_config = lm.config.get_text_config()
        output_embeddings = lm.get_output_embeddings()
        vocab_size = output_embeddings.weight.shape[0] if output_embeddings is not None else text_config.vocab_size
        config = NADOConfig(
            hidden_size=text_config.hidden_size,
            vocab_size=vocab_size,
            num_layers=num_layers,
            hidden_state_layer=hidden_state_layer,
            base_model_name_or_path=getattr(lm.config, "_name_or_path", None),
            **kwargs,
        )
        return cls(config)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = hidden_states.to(self.head.weight.dtype)
        if self.layers:
            mask = _causal_padding_mask(
                attention_mask,
                hidden_states.shape[1],
                self.config.num_attention_heads,
                hidden_states.device,
                hidden_states.dtype,
            )
            for layer in self.layers:
                hidden_states = layer(hidden_states, src_mask=mask)
        return self.head(self.norm(hidden_states))
