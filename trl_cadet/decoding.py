"""NADO-guided decoding: sample from `q(v | ctx) ∝ p(v | ctx) · R(ctx, v)` with any LM and a trained NADO model.

`log q` is the LM's logits plus `log sigmoid(r)`, so guided decoding is a logits processor: a baseline with no
fine-tuning at all, and a way to use a NADO model at inference.
"""

import torch
from transformers import LogitsProcessor, PreTrainedModel

from .modeling_nado import NADOModel
from .nado import guided_logits


class NADOLogitsProcessor(LogitsProcessor):
    """Adds `strength · log sigmoid(r(ctx, ·))` to the next-token scores during `generate`.

    The NADO model reads the LM's last hidden state, which this processor captures with a forward hook on the LM's
    decoder (so no second forward pass is run). With `strength=1` and an untouched temperature, sampling follows
    exactly `q = target_logprobs(lm_logits, nado_logits)`; larger values enforce the constraint harder.

    Args:
        model ([`~transformers.PreTrainedModel`]): the LM that generates (a PEFT model works too).
        nado ([`NADOModel`]): a NADO model trained on this LM's hidden states (e.g. the `nado/` folder of a
            `CADETTrainer` run).
        strength (`float`, *optional*, defaults to `1.0`): multiplier of `log R`.

    Example:

    ```python
    >>> processor = NADOLogitsProcessor(model, NADOModel.from_pretrained("my-run/nado"))
    >>> model.generate(**inputs, logits_processor=[processor], do_sample=True)
    >>> processor.remove()  # detach the hook when done
    ```

    Extra NADO layers attend over the whole context, captured as it is generated; left padding is not masked for them.
    """

    def __init__(self, model: PreTrainedModel, nado: NADOModel, strength: float = 1.0):
        if nado.config.hidden_state_layer not in (-1, model.config.get_text_config().num_hidden_layers):
            raise ValueError(
                f"Guided decoding captures the LM's last hidden state, but this NADO model reads hidden state "
                f"{nado.config.hidden_state_layer}. Use a NADO model trained with `nado_hidden_state_layer=-1`."
            )
        self.nado = nado
        self.strength = strength
        self._output_embeddings = model.get_output_embeddings()
        self._hidden: torch.Tensor | None = None
        self._handle = model.get_decoder().register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        if not self.nado.config.num_layers:
            self._hidden = hidden[:, -1:]  # a position-wise head only needs the newest position
        elif self._hidden is None or hidden.shape[1] > 1 or hidden.shape[0] != self._hidden.shape[0]:
            self._hidden = hidden  # the prefill of a new `generate` call
        else:
            self._hidden = torch.cat([self._hidden, hidden], dim=1)

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._hidden is None:
            raise RuntimeError("The LM ran no forward pass through its decoder before scoring; cannot guide it.")
        device = next(self.nado.parameters()).device
        embeddings = None if self._output_embeddings is None else self._output_embeddings.weight
        r = self.nado(self._hidden.to(device), output_embeddings=embeddings)[:, -1].to(scores.device)
        return guided_logits(scores, r, self.strength).to(scores.dtype)

    def remove(self) -> None:
        """Detach the hook from the LM."""
        self._handle.remove()
