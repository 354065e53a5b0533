"""The auxiliary NADO model: `R(ctx, v) = sigmoid(r(ctx, v))` for every next token `v`, in one forward pass.

It reads the hidden states of the LM and holds no copy of the LM's weights, so it fits beside a 4-bit 7B model. Two
heads (see METHOD.md and docs/cadet_trainer.md):

- `"tied"` (default): `r(ctx, v) = b + w·h + θ·E_v + (Q h)·(P^T E_v)` with `E_v` the LM's own output embedding of `v`
  (read at each call, never stored) and `Q`, `P` of rank `rank`. Every sampled token trains what all tokens share, so
  a few hundred labelled sequences are enough to generalise to tokens never sampled.
- `"full"`: a `Linear(hidden, |V|)` head, as in the reference code; a row learns only when its token was sampled.

Both start with `r` constant in `v` (`w`, `θ`, `P` and the full head at zero, `b = logit(prior)`): `R` does not depend
on the next token, so `q = p` and the regulariser is zero before the first oracle phase. `b` is set to the logit of
the first phase's mean label (`set_prior`), so that training starts at the base rate.
"""

import json
import math
import os
import uuid

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import CONFIG_NAME


# Written by `CADETTrainer.save_model` into the NADO folder and, last, into the model's folder with the same id: the
# two match only when the save of the model and of its NADO model both completed
SAVE_RECORD_NAME = "cadet_save.json"
MODEL_FILES = (CONFIG_NAME, "adapter_config.json")


def new_save_record() -> dict:
    """A record for a save in progress; write it with `write_save_record`, into the NADO folder first, the model's
    folder last."""
    return {"save_id": uuid.uuid4().hex}


def write_save_record(folder: str, record: dict) -> None:
    """Write `record` into `folder` in one rename, so that a reader never sees half of it."""
    path = os.path.join(folder, SAVE_RECORD_NAME)
    with open(f"{path}.tmp", "w") as f:
        json.dump(record, f)
    os.replace(f"{path}.tmp", path)


def remove_save_record(folder: str) -> None:
    """Mark `folder` as being saved: until a new record is written, its model and NADO model may not match."""
    try:
        os.remove(os.path.join(folder, SAVE_RECORD_NAME))
    except FileNotFoundError:
        pass


def _read_save_record(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, SAVE_RECORD_NAME)) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_save_record(nado_dir: str) -> None:
    """Raise if the NADO model in `nado_dir` was saved beside a model by a save that did not complete.

    A NADO folder without a record (saved by itself, or by an older version) and one copied away from its model are
    not checked.
    """
    own = _read_save_record(nado_dir)
    if own is None:
        return
    model_dir = os.path.dirname(os.path.normpath(nado_dir))
    beside = _read_save_record(model_dir)
    if beside is None and not any(os.path.exists(os.path.join(model_dir, name)) for name in MODEL_FILES):
        return
    if beside is None or beside.get("save_id") != own.get("save_id"):
        raise ValueError(
            f"The NADO model in {nado_dir} does not belong to the model saved in {model_dir}: the save there did not "
            f"complete (interrupted while writing the model or the NADO model; {SAVE_RECORD_NAME} "
            f"{'is missing' if beside is None else 'names another save'}), so the two may come from different points "
            "of training. Save again from the last checkpoint (`trainer.train(resume_from_checkpoint=True)`, then "
            "`trainer.save_model()`), or load a `checkpoint-N` folder, which is always complete."
        )


def lm_dimensions(lm: PreTrainedModel) -> tuple[int, int]:
    """(logits dimension, hidden size) of an LM, read without materialising any weight."""
    text_config = lm.config.get_text_config()
    vocab_size = text_config.vocab_size
    head = lm.get_output_embeddings()
    if head is not None:
        # DeepSpeed ZeRO-3 partitions weights into empty tensors and keeps the full shape in `ds_shape`
        vocab_size = getattr(head.weight, "ds_shape", head.weight.shape)[0]
    return vocab_size, text_config.hidden_size


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
        head (`str`, *optional*, defaults to `"tied"`):
            `"tied"`: a low-rank head through the LM's output embeddings, which `forward` needs as
            `output_embeddings`. `"full"`: a vocabulary-sized linear head.
        rank (`int`, *optional*, defaults to `16`):
            Rank of the context-token interaction of the tied head (`0`: none, `r = b + w·h + θ·E_v`).
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
        head: str = "tied",
        rank: int = 16,
        base_model_name_or_path: str | None = None,
        **kwargs,
    ):
        if head not in ("tied", "full"):
            raise ValueError(f"`head` must be 'tied' or 'full', got {head!r}.")
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads or max(1, hidden_size // 64)
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.hidden_state_layer = hidden_state_layer
        self.head = head
        self.rank = rank
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

    `forward(hidden_states, attention_mask=None, output_embeddings=None)` takes `[..., L, hidden_size]` states
    (causally aligned, as the LM's logits: position `t` scores the token at `t + 1`) and returns `[..., L, vocab_size]`
    logits `r` with `R = sigmoid(r)`. The tied head needs the LM's output embeddings `[vocab_size, hidden_size]` (its
    LM-head weight), read at each call.

    Example:

    ```python
    >>> outputs = lm(input_ids, output_hidden_states=True)
    >>> nado_logits = nado(
    ...     outputs.hidden_states[nado.config.hidden_state_layer], output_embeddings=lm.get_output_embeddings().weight
    ... )
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
        if config.head == "full":
            self.head = nn.Linear(config.hidden_size, config.vocab_size)
        else:
            self.bias = nn.Parameter(torch.zeros(()))
            self.context = nn.Linear(config.hidden_size, 1, bias=False)  # w
            self.token = nn.Parameter(torch.zeros(config.hidden_size))  # θ
            self.query = nn.Linear(config.hidden_size, config.rank, bias=False) if config.rank else None  # Q
            self.key = nn.Parameter(torch.zeros(config.hidden_size, config.rank))  # P (no columns when rank is 0)
        # Whether `bias` was set from the labels of a first oracle phase (saved with the weights)
        self.register_buffer("prior_is_set", torch.zeros((), dtype=torch.bool))
        self.post_init()

    def _init_weights(self, module):
        # r starts constant in v; Q keeps a random start so that the product Q·P has a gradient
        if module is getattr(self, "head", None):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)
        elif module is getattr(self, "context", None):
            nn.init.zeros_(module.weight)
        elif module is getattr(self, "query", None):
            nn.init.normal_(module.weight, std=self.config.hidden_size**-0.5)

    @torch.no_grad()
    def set_prior(self, rate: float) -> None:
        """Start `R` at `rate` everywhere (the bias of the head), once: later calls do nothing."""
        if bool(self.prior_is_set):
            return
        rate = min(max(float(rate), 1e-3), 1 - 1e-3)
        logit = math.log(rate / (1 - rate))
        if self.config.head == "full":
            self.head.bias.fill_(logit)
        else:
            self.bias.fill_(logit)
        self.prior_is_set.fill_(True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> "NADOModel":
        """`PreTrainedModel.from_pretrained`, refusing a local NADO folder whose save with its model did not complete
        (see `check_save_record`)."""
        folder = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if os.path.isdir(folder):
            check_save_record(folder)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def from_lm(cls, lm: PreTrainedModel, num_layers: int = 0, hidden_state_layer: int = -1, **kwargs) -> "NADOModel":
        """A new NADO model sized for `lm` (its hidden size and logits dimension)."""
        vocab_size, hidden_size = lm_dimensions(lm)
        config = NADOConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            num_layers=num_layers,
            hidden_state_layer=hidden_state_layer,
            base_model_name_or_path=getattr(lm.config, "_name_or_path", None),
            **kwargs,
        )
        return cls(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.norm.weight.dtype if self.layers else next(self.parameters()).dtype
        hidden_states = hidden_states.to(dtype)
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
        hidden_states = self.norm(hidden_states)
        if self.config.head == "full":
            return self.head(hidden_states)
        if output_embeddings is None:
            raise ValueError(
                "The tied NADO head scores tokens through the LM's output embeddings: pass "
                "`output_embeddings=lm.get_output_embeddings().weight`."
            )
        # Both sides at unit scale (embeddings by their global RMS, states per position), so that the learning rate
        # means the same for any LM. [V, rank + 1] is computed in the embeddings' own dtype and device, then cast: no
        # copy of the embeddings is made
        embeddings = output_embeddings.detach()
        projection = torch.cat([self.key, self.token[:, None]], dim=1)
        token_side = (embeddings @ projection.to(embeddings.dtype)).to(device=hidden_states.device, dtype=dtype)
        rms = torch.linalg.vector_norm(embeddings, dtype=torch.float32) / embeddings.numel() ** 0.5
        token_side = token_side / rms.clamp(min=1e-12).to(token_side.device)
        token_keys, token_bias = token_side[:, :-1], token_side[:, -1]
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + 1e-6)
        r = self.bias + self.context(hidden_states) + token_bias  # [..., L, V]
        return r if self.query is None else r + self.query(hidden_states) @ token_keys.T
