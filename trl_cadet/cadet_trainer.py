import copy
import hashlib
import json
import logging
import os
import random
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, gather_object
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from .cadet_config import CADETConfig
from .checkpoints import (
    CADET_STATE_NAME,
    NADO_DIR,
    NADO_OPTIMIZER_NAME,
    PENDING_NADO_DIR,
    STAGING_DIR,
    checkpoint_problem,
    last_complete_checkpoint,
    publish,
    read_cadet_state,
    write_cadet_state,
)
from .data_utils import (
    assistant_markers,
    assistant_token_mask,
    check_corpus_columns,
    extract_completions,
    formatted_corpus,
    oracle_prompts,
    prompt_column,
    row_completions,
    tokenizer_of,
)
from .modeling_nado import (
    NADOConfig,
    NADOModel,
    lm_dimensions,
    new_save_record,
    remove_save_record,
    write_save_record,
)
from .nado import adaptive_lambda, cadet_kl, regularized_mask, target_token_weights
from .oracle_phase import (
    Labelling,
    PhaseResult,
    RolloutPrefixes,
    Samples,
    collate_samples,
    find_violations,
    first_violations,
    head_gives_logits,
    label_samples,
    output_embedding_weight,
    run_oracle_phase,
    snapshot_policy,
)
from .oracles.base import OraclePhaseStopped, call_oracles, oracle_name
from .oracles.registry import load_oracle
from .progress import RoundProgressCallback
from .sampling import end_token_ids
from .trainability import NoGradientWarning, keep_4bit_layers_trainable


logger = logging.getLogger(__name__)

CITATION = """\
@inproceedings{meng2024attribute,
    title     = {{Attribute Controlled Fine-tuning for Large Language Models: A Case Study on Detoxification}},
    author    = {Tao Meng and Ninareh Mehrabi and Palash Goyal and Anil Ramakrishna and Aram Galstyan and Richard Zemel and Kai-Wei Chang and Rahul Gupta and Charith Peris},
    booktitle = {Findings of the Association for Computational Linguistics: EMNLP 2024},
    year      = 2024,
    eprint    = {arXiv:2410.05559}
}"""


def _check_nado_fits(nado_config: NADOConfig, lm: PreTrainedModel) -> None:
    vocab_size, hidden_size = lm_dimensions(lm)
    if (nado_config.vocab_size, nado_config.hidden_size) != (vocab_size, hidden_size):
        raise ValueError(
            f"The NADO model scores {nado_config.vocab_size} tokens from {nado_config.hidden_size}-wide states, but "
            f"the LM has {vocab_size} logits and {hidden_size}-wide states. Use a NADO model trained for this LM, or "
            "leave `nado_model`/`nado_model_name_or_path` unset to start from a new one."
        )


def _satisfying_examples(corpus: Dataset, oracle_funcs: list, args: CADETConfig) -> tuple[list[int], int]:
    """`filter_corpus`: the indices of the corpus examples none of whose completions (`row_completions`) the oracles
    score below `oracle_threshold` (a completion they could not score counts as satisfied), and the oracle calls made.
    Each process judges its share of the examples, in batches of `generation_batch_size`; all gather the result."""
    state = PartialState()
    rank, processes = state.process_index, state.num_processes
    pairs = [
        (index, pair)
        for index in range(rank, len(corpus), processes)
        for pair in row_completions(corpus[index], args.dataset_text_field)
    ]
    unsatisfied, unscored = set(), 0
    size = args.generation_batch_size
    for start in range(0, len(pairs), size):
        batch = pairs[start : start + size]
        scores = call_oracles(
            oracle_funcs,
            [prompt for _, (prompt, _) in batch],
            [completion for _, (_, completion) in batch],
            weights=args.oracle_weights,
            max_retries=args.oracle_max_retries,
            timeout=args.oracle_timeout,
            retry_delay=args.oracle_retry_delay,
        ).scores
        for (index, _), score in zip(batch, scores, strict=True):
            if score is None:
                unscored += 1
            elif score < args.oracle_threshold:
                unsatisfied.add(index)
    calls = len(pairs)
    if processes > 1:
        parts = gather_object([(sorted(unsatisfied), calls, unscored)])
        unsatisfied = {index for part, _, _ in parts for index in part}
        calls, unscored = sum(part[1] for part in parts), sum(part[2] for part in parts)
    keep = [index for index in range(len(corpus)) if index not in unsatisfied]
    if not keep:
        raise ValueError(
            f"`filter_corpus=True`: the oracles score every one of the {len(corpus)} corpus examples below "
            f"`oracle_threshold={args.oracle_threshold}`, so nothing is left to train on. Check the oracles' scores "
            "(1 means satisfied) and the threshold, or set `filter_corpus=False`."
        )
    if unscored:
        logger.warning(
            "filter_corpus: the oracles could not score %d corpus completions; their examples are kept.", unscored
        )
    logger.info(
        "filter_corpus: the oracles scored %d of %d corpus examples unsatisfied (%d calls); the LM loss trains on the "
        "other %d.",
        len(unsatisfied),
        len(corpus),
        calls,
        len(keep),
    )
    return keep, calls


def _tokens_key(tokens) -> bytes:
    """A short key for a row's token ids (a list or a 1-D tensor)."""
    return hashlib.blake2b(torch.as_tensor(tokens, dtype=torch.int64).numpy().tobytes(), digest_size=16).digest()


def _pad_front(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    """`tensor` `[B, L]` with `width` columns of `value` in front."""
    if not width:
        return tensor
    return torch.cat([tensor.new_full((tensor.shape[0], width), value), tensor], dim=1)


class _RoundTimer(TrainerCallback):
    """Keeps the trainer's round clock in step with the optimisation steps."""

    def __init__(self, trainer: "CADETTrainer"):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        # Done by `CADETTrainer.log` when Trainer logs its training summary; here for a loop that ends without one
        self.trainer._end_last_round()


class CADETTrainer(SFTTrainer):
    """
    Trainer for CADET: attribute-controlled fine-tuning, introduced in [Attribute Controlled Fine-tuning for Large
    Language Models: A Case Study on Detoxification](https://huggingface.co/papers/2410.05559).

    A drop-in [`~trl.SFTTrainer`]: the corpus, its formats and every SFT option work unchanged. Training runs in rounds.
    Each round has an oracle phase (sample completions of the current LM for a set of prompts, label them with the
    oracles, train the NADO model that predicts for every next token the chance `R` that the completion will satisfy
    the constraint) and a fine-tuning phase where the loss is the LM loss plus `λ · KL(q ‖ p_θ)`, `q ∝ p_θ · R` being
    the closest distribution to the current LM that satisfies the constraint.

    Example:

    ```python
    from datasets import load_dataset
    from trl_cadet import CADETConfig, CADETTrainer

    dataset = load_dataset("trl-lib/Capybara", split="train")
    trainer = CADETTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        oracle_funcs="detoxify",
        args=CADETConfig(output_dir="Qwen2.5-0.5B-CADET", cadet_lambda=1.0),
        train_dataset=dataset,
    )
    trainer.train()
    ```

    Args:
        model (`str` or [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The model to train, as in [`~trl.SFTTrainer`]: a path or Hub id (loaded with `args.model_init_kwargs` and
            `quantization_config`), or a model.
        oracle_funcs (callable, model, `str`, or a list of them, *optional*):
            The sequence-level oracle(s), in TRL's reward-function conventions: a callable
            `(prompts, completions, **kwargs) -> list[float]` returning a satisfaction score in `[0, 1]` per
            completion (1 = constraint satisfied, `None` or NaN = no verdict, the sample is dropped); a
            sequence-classification model or its path; or a built-in name (`"detoxify"`, `"jigsaw"`, `"profanity"`).
            Several oracles are combined by a weighted mean (`args.oracle_weights`). Defaults to `"detoxify"`.
        args ([`CADETConfig`], *optional*):
            Configuration. Defaults to `CADETConfig(f"{model_name}-CADET")`. `TrainingArguments` (an `SFTConfig`
            too) are converted to a `CADETConfig` with the same values, as `SFTTrainer` converts them.
        train_dataset, eval_dataset, data_collator, processing_class, compute_metrics, callbacks, optimizers,
        optimizer_cls_and_kwargs, preprocess_logits_for_metrics, quantization_config, peft_config, formatting_func:
            As in [`~trl.SFTTrainer`].
        prompt_dataset ([`~datasets.Dataset`], *optional*):
            Prompts for the oracle phase, in a `prompt` column (standard or conversational). Defaults to prompts taken
            from `train_dataset`.
        nado_model ([`NADOModel`], *optional*):
            A NADO model to start from. Defaults to `args.nado_model_name_or_path`, or a zero-initialised one.
        compute_loss_func:
            Refused with an error that says why: CADET computes its own loss (see `loss_type`).
    """

    # A CADET model is fine-tuned on a corpus like an SFT one: it keeps SFTTrainer's tags, which the Hub searches by
    _tag_names = ["trl", "sft", "cadet"]
    _name = "CADET"
    _paper = {
        "title": "Attribute Controlled Fine-tuning for Large Language Models: A Case Study on Detoxification",
        "id": "2410.05559",
        "citation": CITATION,
    }

    def __init__(
        self,
        model: "str | PreTrainedModel",
        oracle_funcs: Any = None,
        args: CADETConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        prompt_dataset: Dataset | None = None,
        nado_model: NADOModel | None = None,
        compute_loss_func=None,
    ):
        if compute_loss_func is not None:
            raise ValueError(
                "CADETTrainer does not take a `compute_loss_func`: its loss is the LM loss plus λ times the regulariser, "
                "both computed from the logits of the trained positions, which a custom loss function would replace. "
                "Use `loss_type` ('nll' or 'dft'), or subclass CADETTrainer and override `compute_loss`."
            )
        if args is None:
            model_name = model if isinstance(model, str) else model.config._name_or_path
            args = CADETConfig(f"{model_name.split('/')[-1]}-CADET")
        elif isinstance(args, TrainingArguments) and not isinstance(args, CADETConfig):
            # As SFTTrainer does with `TrainingArguments`: the same values, CADET's defaults for its own parameters
            values = args.to_dict()
            # `to_dict` hides every `*_token` value (`hub_token`, and an SFTConfig's `eos_token` and `pad_token`)
            values.update({key: getattr(args, key) for key in values if key.endswith("_token")})
            args = CADETConfig(**values)
        elif not isinstance(args, CADETConfig):
            raise TypeError(
                f"`args` must be a `CADETConfig` (or `TrainingArguments`/`SFTConfig`, which are converted), got "
                f"`{type(args).__name__}`. Pass a `CADETConfig`."
            )
        # Everything that can be checked before SFTTrainer loads the model and tokenizes the corpus is checked here
        if train_dataset is None:
            raise ValueError("`train_dataset` is required: CADET fine-tunes on a corpus, like `SFTTrainer`.")
        for name, dataset in (("train_dataset", train_dataset), ("prompt_dataset", prompt_dataset)):
            if isinstance(dataset, Dataset) and len(dataset) == 0:
                raise ValueError(f"`{name}` is empty. Pass a dataset with at least one example.")
        if formatting_func is None and not (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            check_corpus_columns(train_dataset, args.dataset_text_field)
        # SFTTrainer trains on the formatted text: the oracle phase reads its prompts and completions there too
        corpus = train_dataset
        if formatting_func is not None:
            corpus = formatted_corpus(train_dataset, formatting_func, args.dataset_text_field)
        if args.regularized_corpus != "all":
            self._check_rows_can_be_judged(args, train_dataset, eval_dataset)
        prompt_source, prompt_source_name = (
            (prompt_dataset, "prompt_dataset") if prompt_dataset is not None else (corpus, "train_dataset")
        )
        prompt_column(prompt_source, args.dataset_text_field, prompt_source_name)
        tokenizer = tokenizer_of(processing_class)
        if tokenizer is not None:
            self._check_pad_token(tokenizer, args)
            prompts, prompt_ids = oracle_prompts(prompt_source, prompt_source_name, tokenizer, args)

        if oracle_funcs is None:
            oracle_funcs = ["detoxify"]
        elif not isinstance(oracle_funcs, list | tuple):
            oracle_funcs = [oracle_funcs]
        if not oracle_funcs:
            raise ValueError("`oracle_funcs` is empty. Pass at least one oracle, e.g. `oracle_funcs='detoxify'`.")
        if args.oracle_weights is not None and len(args.oracle_weights) != len(oracle_funcs):
            raise ValueError(
                f"`oracle_weights` has {len(args.oracle_weights)} values for {len(oracle_funcs)} oracles. Give one "
                "weight per oracle, or leave it unset for equal weights."
            )
        oracle_funcs = [load_oracle(oracle) for oracle in oracle_funcs]
        # The oracle-phase prompts (above) and the NADO model's labelled corpus completions come from the whole corpus;
        # with `filter_corpus`, the LM loss learns the examples the oracles score satisfied
        whole_corpus, filter_calls, filtered_corpus = corpus, 0, None
        if args.filter_corpus:
            columns = set(corpus.column_names or []) if isinstance(corpus, Dataset) else set()
            texts = {"messages"} <= columns or {"conversations"} <= columns or {"prompt", "completion"} <= columns
            texts = texts or args.dataset_text_field in columns
            if not texts or (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
                raise ValueError(
                    "`filter_corpus=True` scores every completion of the corpus before training, which needs a "
                    "`Dataset` of texts, conversations or prompt-completion pairs (not streamed, not pre-tokenized). "
                    "Pass such a `Dataset`, or filter the corpus yourself and set `filter_corpus=False`."
                )
            keep, filter_calls = _satisfying_examples(corpus, oracle_funcs, args)
            # Saved in checkpoints: a resumed run warns when its own filtering kept other examples
            filtered_corpus = {"kept": len(keep), "of": len(corpus), "digest": _tokens_key(keep).hex()}
            filtered = train_dataset.select(keep)
            corpus = filtered if corpus is train_dataset else corpus.select(keep)
            train_dataset = filtered

        if nado_model is None and args.nado_model_name_or_path is not None:
            path = args.nado_model_name_or_path
            if (os.path.isabs(path) or path.startswith(".")) and not os.path.isdir(path):
                raise ValueError(
                    f"`nado_model_name_or_path={path!r}` is not a folder. Pass the `nado/` folder of a CADET run or "
                    "checkpoint, or leave it unset to start from a new NADO model."
                )
            try:
                nado_model = NADOModel.from_pretrained(args.nado_model_name_or_path)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"Could not load a NADO model from `nado_model_name_or_path={args.nado_model_name_or_path!r}` "
                    f"({type(error).__name__}: {error}). Pass the `nado/` folder of a CADET run or checkpoint, or "
                    "leave it unset to start from a new NADO model."
                ) from error
        if nado_model is not None and isinstance(model, PreTrainedModel):
            _check_nado_fits(nado_model.config, model)

        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )
        self.oracle_funcs = oracle_funcs
        # With `regularized_corpus` "unsatisfied" or "violations": the examples of the training and evaluation
        # corpora, and each tokenized row's (source, index) by its tokens, so that a batch's completions are judged as
        # TRL's reward functions are called (see `_in_unsatisfied_completions`)
        self._corpora: dict[str, Dataset] = {}
        self._corpus_rows: dict[bytes, tuple[str, int]] = {}
        if args.regularized_corpus != "all":
            self._index_corpus_rows("train", corpus, self.train_dataset)
            evaluated = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
            prepared = self.eval_dataset if isinstance(self.eval_dataset, dict) else {"eval": self.eval_dataset}
            for name, dataset in evaluated.items():
                if dataset is not None:
                    if formatting_func is not None:
                        dataset = formatted_corpus(dataset, formatting_func, args.dataset_text_field)
                    self._index_corpus_rows(f"eval:{name}", dataset, prepared[name])
        # The oracle phase runs the policy in eval mode, which on some CPUs makes bitsandbytes repack 4-bit weights
        # into a layout gradients do not flow through
        keep_4bit_layers_trainable(self.model)
        self.add_callback(NoGradientWarning())
        if tokenizer is None:  # loaded by SFTTrainer from the model's path
            tokenizer = self._tokenizer
            self._check_pad_token(tokenizer, args)
            prompts, prompt_ids = oracle_prompts(prompt_source, prompt_source_name, tokenizer, args)
        if tokenizer.pad_token_id is None:
            # SFTTrainer sets the pad token only when it builds the data collator; sampling needs one in any case
            tokenizer.pad_token = args.pad_token or tokenizer.eos_token
            logger.info("The tokenizer has no pad token; CADET pads sampled batches with %r.", tokenizer.pad_token)
        self.prompts, self.prompt_ids = prompts, prompt_ids
        # Ω applies where R is defined: the assistant turns of a conversational corpus (never system prompts, user
        # turns or chat headers); elsewhere the trained-on tokens
        first_example = train_dataset[0] if isinstance(train_dataset, Dataset) else next(iter(train_dataset))
        self._assistant_markers = None
        if formatting_func is None and is_conversational(first_example):
            self._assistant_markers = assistant_markers(tokenizer)
            if self._assistant_markers is None:
                logger.warning(
                    "Could not find how the chat template opens and closes assistant turns, so the regulariser applies "
                    "to every trained-on token, the user turns included. Use a chat template with a generation prompt "
                    "and a special end-of-turn token."
                )
        self._corpus_completions = extract_completions(
            whole_corpus,
            tokenizer,
            args.nado_corpus_samples,
            args.max_completion_length,
            args.corpus_prompt_length,
            args.dataset_text_field,
            seed=args.seed,
        )

        if args.cadet_max_grad_ratio is not None and (self.is_deepspeed_enabled or self.is_fsdp_enabled):
            raise ValueError(
                "`cadet_max_grad_ratio` takes the gradients of the LM loss and of the regulariser apart over the whole "
                "trainable parameters, which DeepSpeed and FSDP partition across processes. Set "
                "`cadet_max_grad_ratio=None`, or train on one device or with plain data parallelism (DDP)."
            )
        if args.cadet_max_grad_ratio is not None and args.fp16:
            logger.warning(
                "`cadet_max_grad_ratio` takes the LM loss's and the regulariser's gradients apart without fp16's loss "
                "scaling, and trains on them: small gradients may underflow in float16. Prefer `bf16=True` (or float32)."
            )
        sharded = self.is_fsdp_enabled or is_deepspeed_zero3_enabled()
        if args.round_schedule == "parallel" and sharded:
            raise ValueError(
                "The parallel schedule samples from a full copy of the policy, which cannot be taken from weights "
                "sharded by FSDP or DeepSpeed ZeRO-3. Use `round_schedule='sequential'`, or DeepSpeed ZeRO-1/2."
            )
        if args.round_schedule == "parallel" and self.accelerator.num_processes > 1:
            raise ValueError(
                "The parallel schedule runs the oracle phase in a background thread, which cannot take part in the "
                "collective operations of a multi-process run. Use `round_schedule='sequential'` with several "
                "processes, or one process with `oracle_device` set to a second device."
            )

        # NADO model: the one the regulariser reads, and (parallel schedule) a second one trained in the background
        lm = self.accelerator.unwrap_model(self.model)
        lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        if nado_model is None:
            nado_model = NADOModel.from_lm(
                lm,
                num_layers=args.nado_num_layers,
                hidden_state_layer=args.nado_hidden_state_layer,
                head=args.nado_head,
                rank=args.nado_rank,
            )
        if nado_model.config.head == "tied" and (sharded or lm.get_output_embeddings() is None):
            raise ValueError(
                "The tied NADO head reads the LM's output embeddings, which this LM does not hold whole (FSDP or "
                "DeepSpeed ZeRO-3 shard them, or it has no LM head). Set `nado_head='full'`."
            )
        _check_nado_fits(nado_model.config, lm)
        max_positions = getattr(lm.config.get_text_config(), "max_position_embeddings", None)
        longest = max(len(ids) for ids in self.prompt_ids) + args.max_completion_length
        if max_positions is not None and longest > max_positions:
            logger.warning(
                "The longest oracle-phase prompt plus `max_completion_length=%d` is %d tokens, more than the model's "
                "`max_position_embeddings=%d`. Lower `max_prompt_length` or `max_completion_length`.",
                args.max_completion_length,
                longest,
                max_positions,
            )
        self.nado = nado_model.to(device=self.accelerator.device, dtype=torch.float32).eval()
        self.nado.requires_grad_(False)
        if args.round_schedule == "parallel":
            oracle_device = torch.device(args.oracle_device) if args.oracle_device else self.accelerator.device
            self._nado_train = copy.deepcopy(self.nado).to(oracle_device)
            self._oracle_device = oracle_device
            # The background thread uses as many intra-op threads as the trainer (a new thread would otherwise get
            # OpenMP's default, every core)
            self._executor = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="cadet-oracle",
                initializer=torch.set_num_threads,
                initargs=(torch.get_num_threads(),),
            )
        else:
            self._nado_train = self.nado
            self._oracle_device = self.accelerator.device
            self._executor = None
        self._nado_train.requires_grad_(True)
        self.nado_optimizer = torch.optim.AdamW(self._nado_train.parameters(), lr=args.nado_learning_rate)
        self._nado_train.requires_grad_(False)
        # Without warm start, each oracle phase trains the NADO model from this state
        self._nado_initial = (
            None if args.nado_warm_start else {k: v.detach().clone() for k, v in self._nado_train.state_dict().items()}
        )

        # Round state: everything here is saved in checkpoints
        self.cadet_lambda = args.cadet_lambda
        self.current_round = -1
        self.nado_source_round: int | None = None  # the round whose policy generated the NADO's training samples
        self.oracle_calls = filter_calls
        self._filtered_corpus = filtered_corpus  # with `filter_corpus`: which examples the LM loss learns
        self._latest_samples = Samples()
        # With `regularized_corpus` "unsatisfied" or "violations": the oracles' score of each corpus completion met so
        # far, by "source:row:completion"
        self._corpus_scores: dict[str, float] = {}
        # With "violations": the length of each unsatisfied one's shortest unsatisfied prefix, by the same key
        self._corpus_violations: dict[str, int] = {}
        self._corpus_samples: Samples | None = None  # the labelled corpus completions, once the first phase ran
        self._rollout_prefixes: RolloutPrefixes | None = None  # where corpus-prefix rollouts start, found then too
        self._warned_no_unsatisfied_prompts = False
        # The oracle phase whose NADO model is not installed yet: running in the background (parallel schedule), or
        # finished (waited for at a checkpoint, which saves it as it is, or restored from one)
        self._running_phase: Future | None = None
        self._finished_phase: PhaseResult | None = None
        self._stop_phase = threading.Event()  # set when training stops early, to end a background phase promptly
        self._snapshot: PreTrainedModel | None = None
        self._round_started_at: float | None = None
        self._round_blocking = 0.0
        # Seconds oracle phases held training up in this process: in all, and at the start of the latest round
        self.oracle_blocking_s, self.last_oracle_blocking_s = 0.0, 0.0
        self._head_gives_logits: bool | None = None  # decided on the first batch, see `_trained_logits`
        self._neutral_end_ids: torch.Tensor | None = None  # see `_neutral_tokens`
        # With `cadet_max_grad_ratio`: `(step, factor)` of the latest measured bound, reused until it is due again
        self._omega_scale: tuple[int, float] | None = None
        self.add_callback(_RoundTimer(self))
        # Trainer's progress bar estimates the time left from its recent steps, oracle phase included
        if any(type(callback) is ProgressCallback for callback in self.callback_handler.callbacks):
            self.callback_handler.pop_callback(ProgressCallback)
            self.add_callback(RoundProgressCallback(self))

    @staticmethod
    def _check_rows_can_be_judged(args: CADETConfig, train_dataset, eval_dataset) -> None:
        evaluated = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
        if isinstance(train_dataset, IterableDataset) or any(isinstance(d, IterableDataset) for d in evaluated):
            problem = "a corpus is streamed (an `IterableDataset`), so its rows cannot be looked up"
        elif args.packing or args.eval_packing or args.padding_free:
            problem = "packing and padding-free batches join rows"
        elif (args.dataset_kwargs or {}).get("skip_prepare_dataset", False):
            problem = "with `skip_prepare_dataset` the rows hold tokens only, no completion to judge"
        else:
            return
        raise ValueError(
            f"`regularized_corpus={args.regularized_corpus!r}` judges each completion of a batch through the example "
            f"it was tokenized from, but {problem}. Pass a `Dataset` without packing or padding-free batches, or set "
            "`regularized_corpus='all'`."
        )

    def _index_corpus_rows(self, source: str, examples: Dataset, prepared: Dataset) -> None:
        """Keep `examples` as `source` and find each of its rows by the tokens SFTTrainer made of it (`prepared`, in
        the same order)."""
        if len(examples) != len(prepared):
            raise ValueError(
                f"The {source} corpus has {len(examples)} examples but {len(prepared)} tokenized rows, so "
                f"`regularized_corpus={self.args.regularized_corpus!r}` cannot tell which example a row comes from. "
                "Filter the dataset before passing it, or set `regularized_corpus='all'`."
            )
        self._corpora[source] = examples
        for index, tokens in enumerate(prepared["input_ids"]):
            self._corpus_rows.setdefault(_tokens_key(tokens), (source, index))

    @staticmethod
    def _check_pad_token(tokenizer: PreTrainedTokenizerBase, args: CADETConfig) -> None:
        if args.pad_token is None and tokenizer.pad_token is None and tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token, and CADET pads batches of prompts to sample "
                "them. Set `pad_token` in `CADETConfig` to a token of the vocabulary, or `tokenizer.pad_token` before "
                "building the trainer."
            )

    # Rounds

    def training_step(self, model, inputs, num_items_in_batch=None):
        round_index = self.state.global_step // self.args.steps_per_round
        if round_index != self.current_round:
            self._begin_round(round_index)
        return super().training_step(model, inputs, num_items_in_batch)

    def _round_prompts(self, round_index: int) -> tuple[list[Any], list[list[int]]]:
        """This process's share of the round's prompts: the same draw on every process, then split by rank.

        With `unsatisfied_prompts_share`, that share of them is drawn from the prompts of the labelled corpus
        completions the oracles judged unsatisfied (without replacement while there are enough), the rest uniformly."""
        rng = random.Random(self.args.seed * 1_000_003 + round_index)
        count = min(self.args.prompts_per_round, len(self.prompts))
        eliciting = self._unsatisfied_prompts()
        from_eliciting = round(count * self.args.unsatisfied_prompts_share) if eliciting else 0
        pool = list(zip(self.prompts, self.prompt_ids, strict=True))
        chosen = [pool[i] for i in rng.sample(range(len(pool)), count - from_eliciting)]
        if from_eliciting <= len(eliciting):
            chosen += rng.sample(eliciting, from_eliciting)
        else:
            chosen += [rng.choice(eliciting) for _ in range(from_eliciting)]
        # Every process gets as many prompts (a few drawn twice when they do not divide evenly): the forward passes of
        # a sharded model are collective, so all processes must sample the same number of batches
        processes = self.accelerator.num_processes
        chosen += [pool[rng.randrange(len(pool))] for _ in range(-count % processes)]
        mine = chosen[self.accelerator.process_index :: processes]
        return [prompt for prompt, _ in mine], [ids for _, ids in mine]

    def _unsatisfied_prompts(self) -> list[tuple[Any, list[int]]]:
        """`(prompt, prompt_ids)` of each labelled corpus completion the oracles judged unsatisfied, in the labelled
        completions' order (empty without `unsatisfied_prompts_share` or before the corpus is labelled)."""
        if not self.args.unsatisfied_prompts_share or self._corpus_samples is None:
            return []
        corpus = self._corpus_completions
        prompt_of = {tuple(ids): prompt for prompt, ids in zip(corpus.prompts, corpus.prompt_ids, strict=True)}
        samples = self._corpus_samples
        # A resumed run's labelled completions come from its checkpoint: a prompt no longer in the corpus is skipped
        found = [
            (prompt_of[tuple(ids)], ids)
            for ids, score in zip(samples.prompt_ids, samples.scores, strict=True)
            if score < self.args.oracle_threshold and tuple(ids) in prompt_of
        ]
        if not found and not self._warned_no_unsatisfied_prompts:
            self._warned_no_unsatisfied_prompts = True
            logger.warning(
                "`unsatisfied_prompts_share=%s`, but the oracles judged all %d labelled corpus completions satisfied, "
                "so the oracle phase draws every prompt uniformly. Label more of the corpus (`nado_corpus_samples`), "
                "or set `unsatisfied_prompts_share=0` and pass prompts that elicit violations as `prompt_dataset=`.",
                self.args.unsatisfied_prompts_share,
                len(samples),
            )
        return found

    def _gather(self, labelling: Labelling) -> Labelling:
        """Every process's samples and oracle reports, in process order, so that all train the same NADO model."""
        if self.accelerator.num_processes == 1:
            return labelling
        merged = Labelling()
        for part in gather_object([labelling]):
            merged.merge(part)
        return merged

    def _label_corpus(self) -> None:
        """Label the corpus completions once (each process its share, then gathered), for every round's NADO training."""
        corpus = self._corpus_completions
        rank, processes = self.accelerator.process_index, self.accelerator.num_processes
        labelling = label_samples(
            self.oracle_funcs,
            corpus.prompts[rank::processes],
            corpus.prompt_ids[rank::processes],
            corpus.completion_ids[rank::processes],
            self._tokenizer,
            num_generations=1,
            oracle_weights=self.args.oracle_weights,
            labels=self.args.oracle_labels,
            threshold=self.args.oracle_threshold,
            max_retries=self.args.oracle_max_retries,
            timeout=self.args.oracle_timeout,
            retry_delay=self.args.oracle_retry_delay,
        )
        calls = len(labelling.samples) + labelling.dropped
        if self.args.nado_corpus_rollouts:
            prefixes, bisection_calls = self._find_rollout_prefixes(labelling, rank, processes)
            calls += bisection_calls
            if processes > 1:
                parts = gather_object([(prefixes, calls)])
                self._rollout_prefixes = RolloutPrefixes()
                for part, _ in parts:
                    self._rollout_prefixes.extend(part)
                calls = sum(part_calls for _, part_calls in parts)
            else:
                self._rollout_prefixes = prefixes
            self._metrics["train"]["oracle/rollout_prefixes"].append(float(len(self._rollout_prefixes)))
        elif processes > 1:
            calls = sum(gather_object([calls]))
        labelling = self._gather(labelling)
        self._corpus_samples = labelling.samples
        self.oracle_calls += calls
        if len(labelling.samples):
            satisfied = sum(score >= self.args.oracle_threshold for score in labelling.samples.scores)
            self._metrics["train"]["oracle/corpus_satisfaction"].append(satisfied / len(labelling.samples))

    def _find_rollout_prefixes(self, labelling: Labelling, rank: int, processes: int) -> tuple[RolloutPrefixes, int]:
        """This process's corpus completions that the oracles judged unsatisfied, cut right before their first
        violating token, and the oracle calls that finding it took."""
        corpus = self._corpus_completions
        prompts, prompt_ids = corpus.prompts[rank::processes], corpus.prompt_ids[rank::processes]
        find_violations(self.oracle_funcs, prompts, labelling, self._tokenizer, self.args, num_generations=1)
        prefixes = RolloutPrefixes()
        samples = labelling.samples
        for index, completion, length in zip(labelling.kept, samples.completion_ids, samples.violations, strict=True):
            if length is not None:
                prefixes.prompts.append(prompts[index])
                prefixes.prompt_ids.append(prompt_ids[index])
                prefixes.prefix_ids.append(completion[: length - 1])
        return prefixes, labelling.bisection_calls

    def _oracle_phase(self, policy, round_index: int, gather) -> PhaseResult:
        if self._corpus_samples is None and len(self._corpus_completions.prompts):
            self._label_corpus()  # the first phase, which runs in the foreground in both schedules
        prompts, prompt_ids = self._round_prompts(round_index)
        if self._nado_initial is not None:  # a NADO model trained from the start, on this phase's samples only
            self._nado_train.load_state_dict(self._nado_initial)
            self.nado_optimizer.state.clear()
        result = run_oracle_phase(
            policy,
            self._nado_train,
            self.nado_optimizer,
            self._tokenizer,
            self.oracle_funcs,
            prompts,
            prompt_ids,
            self.args,
            round_index,
            gather=gather,
            corpus_samples=self._corpus_samples,
            rollout_prefixes=None
            if self._rollout_prefixes is None
            else self._rollout_prefixes.share(self.accelerator.process_index, self.accelerator.num_processes),
            # Bars for the phases that hold training up (`gather` is None only in the background, whose bars would
            # tangle with the trainer's)
            progress=gather is not None and self.accelerator.is_main_process and not self.args.disable_tqdm,
            stop=self._stop_phase if gather is None else None,
            # In the background, sampling must not draw from (or rewind) the RNG that the training thread's dropout
            # uses: on CPU, torch's global generator is one for all threads
            private_rng=gather is None,
        )
        if gather is not None and self.accelerator.num_processes > 1:
            # Each process trained its copy on the same samples; make the copies bitwise identical whatever the
            # kernels' non-determinism (one LM-head-sized broadcast per round)
            with torch.no_grad():
                broadcast(list(self._nado_train.state_dict().values()), from_process=0)
        return result

    def _end_last_round(self) -> None:
        """The last round has no successor to close it: finish its background phase and time it."""
        started = time.perf_counter()
        self._finish_pending_phase(install=True)
        blocked = time.perf_counter() - started
        self._round_blocking += blocked
        self.oracle_blocking_s += blocked
        self._close_round()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs and "train_runtime" in logs:
            # Trainer's training summary, its last entry (`log_history[-1]`, as with SFTTrainer): the last round's
            # metrics go in it rather than in an entry of their own after it
            self._end_last_round()
            if not self.model.training:  # an evaluation ran last, so `SFTTrainer.log` reads the eval metrics
                logs.update(
                    {key: sum(values) / len(values) for key, values in self._metrics["train"].items() if values}
                )
                self._metrics["train"].clear()
        super().log(logs, start_time)

    def _close_round(self) -> None:
        """Log the wall-clock of the round in progress, and of its fine-tuning phase (the time not spent waiting for an
        oracle phase)."""
        now = time.perf_counter()
        if self._round_started_at is not None:
            self._metrics["train"]["time/round"].append(now - self._round_started_at)
            self._metrics["train"]["time/finetune_phase"].append(now - self._round_started_at - self._round_blocking)
        self._round_started_at, self._round_blocking = None, 0.0

    def _begin_round(self, round_index: int) -> None:
        self._close_round()
        now = time.perf_counter()
        self._round_started_at = now
        self.current_round = round_index

        if self.args.round_schedule == "sequential" or not self._has_nado:
            # Sequential, and the first round of the parallel schedule: O_k on the current policy, then F_k
            self._finish_pending_phase(install=True)
            with unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as policy:
                result = self._oracle_phase(policy, round_index, gather=self._gather)
            self._install(result)
        else:
            # Parallel: install O_{k-1} (trained on the policy of round k-1), then start O_k on a snapshot of the
            # current policy in the background while F_k runs with the NADO of round k-1
            self._finish_pending_phase(install=True)
            snapshot = self._snapshot_policy()
            self._running_phase = self._executor.submit(self._oracle_phase, snapshot, round_index, None)
        blocked = time.perf_counter() - now
        self._round_blocking += blocked
        self.oracle_blocking_s += blocked
        self.last_oracle_blocking_s = blocked

    def _snapshot_policy(self) -> PreTrainedModel:
        """A frozen copy of the current policy on the oracle device, refreshed in place after the first round."""
        self._snapshot = snapshot_policy(
            self.accelerator.unwrap_model(self.model), self._oracle_device, self._snapshot
        )
        return self._snapshot

    @property
    def _has_nado(self) -> bool:
        """Whether an oracle phase has installed its NADO model; before the first, the regulariser is off."""
        return self.nado_source_round is not None

    def _finish_pending_phase(self, install: bool) -> None:
        """Wait for the background oracle phase, if one runs; install the finished phase's NADO model when `install`,
        else keep it finished and not installed."""
        if self._running_phase is not None:
            self._finished_phase = self._running_phase.result()
            self._running_phase = None
        if install and self._finished_phase is not None:
            result, self._finished_phase = self._finished_phase, None
            self._install(result)

    def _install(self, result: PhaseResult) -> None:
        """Make the NADO model trained by `result`'s phase the one the regulariser reads, count its oracle calls,
        update λ and log the phase."""
        if not self._has_nado:
            self._check_first_phase(result)
        if self._nado_train is not self.nado:
            self.nado.load_state_dict(self._nado_train.state_dict())
        self.nado_source_round = result.round
        self.oracle_calls += (
            len(result.samples)
            + int(result.metrics.get("oracle/dropped", 0))
            + int(result.metrics.get("oracle/rollouts", 0))
            + int(result.metrics.get("oracle/bisection_calls", 0))
        )
        self._latest_samples = result.samples
        self._omega_scale = None  # a new NADO model: measure the bound again at the next step
        self._warn_about_labels(result)
        if self.args.lambda_schedule == "adaptive" and result.satisfaction is not None:
            self.cadet_lambda = adaptive_lambda(
                self.cadet_lambda, result.satisfaction, self.args.target_satisfaction, self.args.lambda_lr
            )
        for key, value in result.metrics.items():
            self._metrics["train"][key].append(value)
        self._metrics["train"]["round"].append(float(result.round))
        self._metrics["train"]["oracle/calls"].append(float(self.oracle_calls))

    @staticmethod
    def _check_first_phase(result: PhaseResult) -> None:
        """Stop training if the first oracle phase labelled nothing: retrying and dropping is for a judge that fails now
        and then; one that has never answered is broken."""
        if result.satisfaction is None:
            why = (
                f"the oracles raised, timed out or returned malformed scores on every attempt: "
                f"{'; '.join(dict.fromkeys(result.errors))}"
                if result.errors
                else "the oracles returned None or NaN for every completion"
            )
            raise RuntimeError(
                f"No sample of the first oracle phase (round {result.round}) could be labelled: {why}. An oracle that "
                "has never returned a score is broken or unreachable rather than failing transiently, so training "
                "stops here instead of running without a constraint. Fix the oracle (call it on a few completions to "
                "check it) or make the judge reachable; failures later in training are retried "
                "(`oracle_max_retries`), then their samples are dropped and counted in `oracle/dropped`."
            )

    @staticmethod
    def _warn_about_labels(result: PhaseResult) -> None:
        """Warn about a phase whose samples cannot teach the NADO model anything."""
        if result.satisfaction is None:
            logger.warning(
                "Every sample of the oracle phase of round %d was dropped (the oracles returned None/NaN or failed); "
                "the NADO model was not updated. Check the oracles.",
                result.round,
            )
        elif len(set(result.samples.labels)) == 1:
            logger.warning(
                "Every sample of round %d got the label %s, so the NADO model has nothing to tell apart and the "
                "regulariser stays weak. Sample more (`prompts_per_round`, `num_generations`), include prompts that "
                "elicit violations, or check the oracle's scores (with `oracle_labels='hard'`, change `oracle_threshold` "
                "or use `oracle_labels='soft'`).",
                result.round,
                result.samples.labels[0],
            )

    # Loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        # logits: [N, V], the trained positions; the rest aligned with `mask`, which may start one position before
        # `input_ids` (`virtual`: the last virtual token of prompt tuning)
        outputs, logits, hidden_states, labels, mask = self._trained_logits(model, model_inputs, inputs["labels"])
        virtual = mask.shape[1] - inputs["input_ids"].shape[1]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is not None:
            attention_mask = _pad_front(attention_mask, virtual, 1)
        omega = self._omega_positions(inputs["input_ids"], mask)
        positions = self.args.regularized_positions
        # Ω's corpus positions: all of `omega`, or those in the completions the oracles score unsatisfied
        regularized = omega
        if self.args.regularized_corpus != "all" and positions != "samples" and self._has_nado:
            regularized = omega & self._in_unsatisfied_completions(inputs["input_ids"], attention_mask, mask, omega)
            share = regularized.sum() / omega.sum().clamp(min=1)
            self._metrics[mode]["cadet/regularized_share"].append(
                self.accelerator.gather_for_metrics(share).mean().item()
            )

        # LM loss, normalised like SFTTrainer's: by the trained-on tokens of the whole batch when known. log p is
        # computed once, for the LM loss and the regulariser
        targets = labels[:, 1:][mask[:, :-1]]
        num_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        normaliser = torch.as_tensor(num_tokens, device=logits.device, dtype=torch.float32).clamp(min=1)
        log_p = torch.log_softmax(logits.float(), dim=-1)
        token_loss = -log_p.gather(-1, targets[:, None])[:, 0]
        if self.args.loss_type == "dft":
            # DFT (https://huggingface.co/papers/2508.05629), as in SFTTrainer: each token's NLL weighed by its
            # probability; the regulariser is added to it as to the NLL
            token_loss = token_loss * torch.exp(-token_loss).detach()
        elif self.args.label_smoothing_factor:
            # As SFTTrainer's `LabelSmoother` (with `loss_type='nll'` only): a share ε of each token's loss is the
            # cross-entropy with the uniform distribution over the vocabulary
            epsilon = self.args.label_smoothing_factor
            token_loss = (1 - epsilon) * token_loss - epsilon * log_p.mean(-1)
        # As SFTTrainer, a token count summed over the processes is made up for by their number
        summed = self.args.average_tokens_across_devices and num_items_in_batch is not None
        processes = self.accelerator.num_processes if summed else 1
        lm_loss = token_loss.sum() / normaliser * processes
        loss = lm_loss

        lam = self.cadet_lambda
        # Ω is one mean over its positions (METHOD.md): the corpus's assistant tokens and, with
        # `regularized_positions="both"`, the oracle samples' completion tokens, so that λ depends neither on the
        # length of the prompts around the completions nor on how many positions each source gives; or, with
        # `samples_kl_weight` w, the corpus's mean plus w times the samples'. With the loss summed over accumulated
        # micro-batches (`num_items_in_batch` known), a micro-batch's Ω and logged KLs are its share of the step's
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        corpus_kl = sample_kl = None
        kl = torch.zeros((), device=logits.device)
        if positions in ("corpus", "both") and self._has_nado and omega.any():
            corpus_kl = logits.new_zeros(0, dtype=torch.float32)
            if regularized.any():
                hidden = hidden_states[self.nado.config.hidden_state_layer].detach()
                embeddings = output_embedding_weight(self.accelerator.unwrap_model(model))
                with torch.no_grad():
                    if self.nado.config.num_layers:
                        nado_logits = self.nado(hidden, attention_mask, output_embeddings=embeddings)[mask]
                        nado_logits = nado_logits[regularized]
                    else:  # the head is position-wise: score Ω's positions only
                        nado_logits = self.nado(hidden[mask][regularized], output_embeddings=embeddings)
                # Only Ω's rows of the `[N, V]` buffers enter the KL (on whole conversations, a minority of the
                # trained positions)
                corpus_kl = self._position_kl(logits[regularized], nado_logits, lm_logprobs=log_p[regularized])
                if self.args.lm_loss_weights == "target" and mode == "train":
                    # Each covered token's NLL times min(1, R(y_t) / R̄): the LM loss learns less of what Ω lowers
                    weights = torch.ones_like(token_loss).index_put(
                        (regularized.nonzero()[:, 0],),
                        target_token_weights(
                            log_p[regularized],
                            nado_logits,
                            targets[regularized],
                            min_p=self.args.cadet_min_p,
                            demote_below=self.args.cadet_demote_below,
                            neutral_tokens=self._neutral_tokens(logits.device),
                        ),
                    )
                    loss = (token_loss * weights).sum() / normaliser * processes
                    self._metrics[mode]["cadet/lm_weight"].append(
                        self.accelerator.gather_for_metrics(weights[regularized].mean()).mean().item()
                    )
            if regularized is not omega:  # KL 0 (q = p) at the satisfied completions' positions, which Ω's mean counts
                corpus_kl = logits.new_zeros(int(omega.sum()), dtype=corpus_kl.dtype).index_put(
                    (regularized[omega].nonzero()[:, 0],), corpus_kl
                )
            kl = corpus_kl.mean() / steps
        every = self.args.samples_kl_steps
        if (
            positions in ("samples", "both")
            and mode == "train"
            and len(self._latest_samples)
            and lam > 0
            and self.state.global_step % every == 0
        ):
            sample_kl = self._samples_kl(model)
            if sample_kl is not None:
                self._metrics[mode]["cadet/kl_samples"].append(sample_kl.mean().item() / steps)
                # run every k-th step only, the samples weigh k times there: as much over k steps as every step
                sample_kl = sample_kl * every
        if lam > 0 and (corpus_kl is not None or sample_kl is not None):
            regulariser = lam * self._omega(corpus_kl, sample_kl) / steps
            if self.args.cadet_max_grad_ratio is not None and mode == "train" and regulariser.requires_grad:
                loss = self._bounded_regulariser(model, loss, regulariser)
            else:
                loss = loss + regulariser

        if self.aux_loss_enabled:
            # As SFTTrainer: a per-micro-batch mean, averaged over the accumulation steps when the loss is summed
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            aux_loss = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()).mean().item()
            self._metrics[mode]["aux_loss"].append(aux_loss)

        with torch.no_grad():
            correct = (logits.argmax(-1) == targets).sum()
            total = mask.sum()
        num_valid = self.accelerator.gather_for_metrics(total).sum()
        accuracy = self.accelerator.gather_for_metrics(correct).sum() / num_valid.clamp(min=1)
        self._metrics[mode]["mean_token_accuracy"].append(accuracy.item())
        self._metrics[mode]["cadet/lm_loss"].append(
            self.accelerator.gather_for_metrics(lm_loss.detach()).mean().item()
        )
        self._metrics[mode]["cadet/kl"].append(self.accelerator.gather_for_metrics(kl.detach()).mean().item())
        self._metrics[mode]["cadet/lambda"].append(lam)
        if mode == "train":
            tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.tensor(labels.numel())
            self._total_train_tokens += self.accelerator.gather_for_metrics(tokens.to(logits.device)).sum().item()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if return_outputs and outputs.logits.shape[1] < mask.shape[1]:
            # The LM-head shortcut kept one position; `compute_metrics` gets the full logits, from a second forward
            # pass as in SFTTrainer
            with torch.no_grad():
                outputs = model(**model_inputs, use_cache=False)
        return (loss, outputs) if return_outputs else loss

    def _bounded_regulariser(self, model, lm_loss: torch.Tensor, regulariser: torch.Tensor) -> torch.Tensor:
        """`lm_loss + s · regulariser`, with `s = min(1, cadet_max_grad_ratio · |∇ lm_loss| / |∇ regulariser|)` over the
        trainable parameters. The two gradients are taken apart here (one backward pass each); the loss returned
        carries their combination to the trainer's backward pass, which then only adds it to the parameters. Between
        measurements (`cadet_grad_ratio_steps`), `s` is the last measured factor and nothing is taken apart."""
        step = self.state.global_step
        if self._omega_scale is not None:
            measured_at, scale = self._omega_scale
            # The micro-batches of a measured step are each measured
            if measured_at < step < measured_at + self.args.cadet_grad_ratio_steps:
                self._metrics["train"]["cadet/omega_scale"].append(scale)
                return lm_loss + scale * regulariser
        params = [p for p in model.parameters() if p.requires_grad]

        def gradient(term):
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

        def norm(grads):
            return torch.sqrt(sum((g.float() ** 2).sum() for g in grads))

        lm_grads, omega_grads = gradient(lm_loss), gradient(regulariser)
        lm_norm, omega_norm = norm(lm_grads), norm(omega_grads)
        scale = torch.clamp(self.args.cadet_max_grad_ratio * lm_norm / omega_norm.clamp(min=1e-12), max=1.0)
        self._metrics["train"]["cadet/grad_ratio"].append((omega_norm / lm_norm.clamp(min=1e-12)).item())
        self._metrics["train"]["cadet/omega_scale"].append(scale.item())
        self._omega_scale = (step, scale.item())
        # A loss whose gradient is the combined one and whose value is the scaled loss
        carrier = sum(((a + scale * b).detach() * p).sum() for a, b, p in zip(lm_grads, omega_grads, params))
        return carrier - carrier.detach() + (lm_loss + scale * regulariser).detach()

    def _omega_positions(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Ω's positions among the trained ones (`mask`, from `_trained_logits`), shape `[N]` aligned with the trained
        logits: those predicting an assistant token of a conversation, or every trained position without a chat
        template's markers."""
        omega = torch.ones_like(mask)
        if self._assistant_markers is not None:
            virtual = mask.shape[1] - input_ids.shape[1]
            assistant = assistant_token_mask(input_ids, self._assistant_markers)
            omega[:, :-1] = _pad_front(assistant, virtual, False)[:, 1:]
        return omega[mask]

    def _in_unsatisfied_completions(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, mask: torch.Tensor, omega: torch.Tensor
    ) -> torch.Tensor:
        """Which of Ω's positions (`[N]`, aligned with `omega`) predict a token of a completion that the oracles score
        unsatisfied (`regularized_corpus="unsatisfied"`), or with `"violations"` one of its tokens up to its first
        violating one (found by bisection, `first_violations`). A batch row is found by its tokens among the tokenized
        corpus rows; its completions (`row_completions`) are, in order, the runs of consecutive tokens that Ω's
        positions predict: the last runs when there are more (assistant turns inside a prompt-completion row's prompt,
        left alone), the first when there are fewer (a row cut at `max_length`). Each completion is judged once, the
        first time a batch holds it (each process its own), as TRL's reward functions are called; one an oracle failed
        on is not regularised, and judged again next time."""
        virtual = mask.shape[1] - input_ids.shape[1]
        grid = torch.zeros_like(mask)
        grid[mask] = omega
        # The tokens that Ω's positions predict, in `input_ids`'s columns (position j predicts token j + 1)
        predicted = _pad_front(grid, 1, False)[:, :-1][:, virtual:].cpu()
        kept = torch.ones_like(predicted) if attention_mask is None else attention_mask[:, -predicted.shape[1] :].cpu()
        ids = input_ids.cpu()
        spans, todo = [], {}
        for row in range(ids.shape[0]):
            found = self._corpus_rows.get(_tokens_key(ids[row][kept[row].bool()]))
            if found is None:
                raise RuntimeError(
                    "A training batch holds a row that is not among the tokenized corpus rows, so "
                    f"`regularized_corpus={self.args.regularized_corpus!r}` cannot tell which completions it holds. "
                    "This happens when the data collator changes the rows (packing, padding-free batches, a custom "
                    "collator). Use TRL's default collator, or `regularized_corpus='all'`."
                )
            source, index = found
            columns = predicted[row].nonzero()[:, 0].tolist()
            starts = [c for i, c in enumerate(columns) if i == 0 or columns[i - 1] != c - 1]
            ends = [c + 1 for i, c in enumerate(columns) if i == len(columns) - 1 or columns[i + 1] != c + 1]
            pairs = row_completions(self._corpora[source][index], self.args.dataset_text_field)
            skipped = max(0, len(starts) - len(pairs))
            for k, pair in enumerate(pairs[: len(starts) - skipped]):
                key = f"{source}:{index}:{k}"
                start, end = starts[skipped + k], ends[skipped + k]
                spans.append((row, start, end, key))
                if key not in self._corpus_scores:
                    todo[key] = (*pair, ids[row, start:end].tolist())
        calls = len(todo)
        if todo:
            prompts, completions, completion_ids = zip(*todo.values(), strict=True)
            retries = dict(
                max_retries=self.args.oracle_max_retries,
                timeout=self.args.oracle_timeout,
                retry_delay=self.args.oracle_retry_delay,
            )
            weights = self.args.oracle_weights
            scores = call_oracles(self.oracle_funcs, prompts, completions, weights=weights, **retries).scores
            threshold = self.args.oracle_threshold
            unsatisfied = [i for i, score in enumerate(scores) if score is not None and score < threshold]
            lengths = {}
            if self.args.regularized_corpus == "violations" and unsatisfied:
                violations, bisection_calls = first_violations(
                    self.oracle_funcs,
                    [prompts[i] for i in unsatisfied],
                    [completion_ids[i] for i in unsatisfied],
                    self._tokenizer,
                    threshold,
                    oracle_weights=weights,
                    **retries,
                )
                calls += bisection_calls
                lengths = dict(zip(unsatisfied, violations, strict=True))
            for i, (key, score) in enumerate(zip(todo, scores, strict=True)):
                # Judged again next time: a completion an oracle failed on, or whose first violation it failed to find
                if score is not None and not (i in lengths and lengths[i] is None):
                    self._corpus_scores[key] = score
                    if i in lengths:
                        self._corpus_violations[key] = lengths[i]
        if self.accelerator.num_processes > 1:  # every process takes this path at every step
            calls = int(self.accelerator.reduce(torch.tensor(calls, device=self.accelerator.device), "sum"))
        self.oracle_calls += calls
        gate = torch.zeros_like(grid)
        for row, start, end, key in spans:
            score = self._corpus_scores.get(key)
            if score is not None and score < self.args.oracle_threshold:
                # With "violations", up to the completion's first violating token (included)
                end = min(end, start + self._corpus_violations.get(key, end - start))
                gate[row, start - 1 + virtual : end - 1 + virtual] = True
        return gate[mask]

    def _trained_logits(self, model, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        """`(outputs, logits, hidden_states, labels, mask)`: the model's outputs; its logits at the trained positions
        (`mask`, from `regularized_mask(labels)`), shape `[N, V]`; and its hidden states, `labels` and `mask`, aligned.

        Prompt-learning PEFT (prompt tuning, p-tuning) prepends virtual tokens to the outputs. As in SFTTrainer, where
        PEFT labels them -100, the last one is trained to predict the first real token: it is kept, `labels` gets a
        -100 column in front for it, and the other virtual tokens are dropped. Like TRL's fused LM head, only the
        trained positions go through the LM head, so that no `[B, L, V]` logits are built, when the head alone turns
        the last hidden states into the logits: checked on the first batch against the model's own logits (a model
        that scales or soft-caps its logits keeps the plain forward), and never with sharded weights (FSDP, ZeRO-3),
        whose head can only run inside the model's forward.
        """
        shortcut = self._head_gives_logits
        kwargs = {"use_cache": False, "output_hidden_states": True}
        if self.aux_loss_enabled:
            kwargs["output_router_logits"] = True  # as SFTTrainer: the model returns its load-balancing `aux_loss`
        if shortcut:
            kwargs["logits_to_keep"] = 1
        outputs = model(**inputs, **kwargs)
        length = inputs["input_ids"].shape[1]
        if outputs.hidden_states[-1].shape[1] > length:
            length += 1
            labels = _pad_front(labels, 1, -100)
        mask = regularized_mask(labels)
        hidden_states = tuple(states[:, -length:] for states in outputs.hidden_states)
        if shortcut:
            head = self.accelerator.unwrap_model(model).get_output_embeddings()
            return outputs, head(hidden_states[-1][mask].to(head.weight.dtype)), hidden_states, labels, mask
        logits = outputs.logits[:, -length:][mask]
        if shortcut is None:
            unwrapped = self.accelerator.unwrap_model(model)
            base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            self._head_gives_logits = base._supports_logits_to_keep() and head_gives_logits(
                unwrapped, hidden_states[-1][mask][:8], logits[:8]
            )
        return outputs, logits, hidden_states, labels, mask

    def _samples_kl(self, model) -> torch.Tensor | None:
        """The KL of Ω at each completion token of a mini-batch of the latest oracle samples (one extra forward pass),
        shape `[n]`, or with `regularized_samples="violations"` at the context of each one's first violating token
        only; `None` when the round has no sample of the kind Ω covers."""
        samples = self._latest_samples
        candidates = range(len(samples))
        if self.args.regularized_samples == "unsatisfied":
            candidates = [i for i in candidates if samples.scores[i] < self.args.oracle_threshold]
        elif self.args.regularized_samples == "violations":
            candidates = [i for i in candidates if samples.violation(i) is not None]
        if not candidates:
            return None
        size = self.args.samples_per_step or self.args.per_device_train_batch_size
        # Every process holds all the samples: each takes its own mini-batch
        seed = self.state.global_step * self.accelerator.num_processes + self.accelerator.process_index
        index = random.Random(seed).sample(candidates, min(size, len(candidates)))
        violations = self.args.regularized_samples == "violations"
        completions = [samples.completion_ids[i] for i in index]
        if violations:  # what follows the first violating token does not enter the pass
            completions = [ids[: samples.violation(i)] for ids, i in zip(completions, index, strict=True)]
        batch = collate_samples(
            [samples.prompt_ids[i] for i in index], completions, self._tokenizer.pad_token_id, self.accelerator.device
        )
        completion_mask = batch["completion_mask"]
        if violations:  # only the position that predicts the last token, the first violating one (right padding)
            completion_mask = torch.zeros_like(completion_mask)
            completion_mask[torch.arange(len(index)), batch["attention_mask"].sum(1) - 1] = 1
        labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        _, logits, hidden_states, _, mask = self._trained_logits(model, inputs, labels)
        attention_mask = _pad_front(batch["attention_mask"], mask.shape[1] - labels.shape[1], 1)
        hidden = hidden_states[self.nado.config.hidden_state_layer].detach()
        embeddings = output_embedding_weight(self.accelerator.unwrap_model(model))
        with torch.no_grad():
            if self.nado.config.num_layers:
                nado_logits = self.nado(hidden, attention_mask, output_embeddings=embeddings)[mask]
            else:  # the head is position-wise: score the regularised positions only
                nado_logits = self.nado(hidden[mask], output_embeddings=embeddings)
        return self._position_kl(logits, nado_logits)

    def _omega(self, corpus_kl: torch.Tensor | None, sample_kl: torch.Tensor | None) -> torch.Tensor:
        """Ω from the KL at its corpus and sample positions (either may be `None`): one mean over all of them, or with
        `samples_kl_weight` w the corpus's mean plus w times the samples'."""
        weight = self.args.samples_kl_weight
        if weight is None:
            return torch.cat([part for part in (corpus_kl, sample_kl) if part is not None]).mean()
        return sum(share * part.mean() for share, part in ((1.0, corpus_kl), (weight, sample_kl)) if part is not None)

    def _position_kl(self, logits, nado_logits, lm_logprobs=None) -> torch.Tensor:
        """The KL of Ω at each position (`[n]`), with the target the config sets (`cadet_min_p`, `cadet_demote_only`,
        `cadet_safe_ratio`, `cadet_demote_below`, `cadet_neutral_end`)."""
        return cadet_kl(
            logits,
            nado_logits,
            reduction="none",
            lm_logprobs=lm_logprobs,
            min_p=self.args.cadet_min_p,
            demote_only=self.args.cadet_demote_only,
            safe_ratio=self.args.cadet_safe_ratio,
            demote_below=self.args.cadet_demote_below,
            neutral_tokens=self._neutral_tokens(logits.device),
        )

    def _neutral_tokens(self, device) -> torch.Tensor | None:
        """The tokens the regulariser's target leaves at p (`cadet_neutral_end`): the tokens that end a sampled
        completion (`end_token_ids`) and the chat template's end-of-turn token. Built once, on the device of the
        logits."""
        if not self.args.cadet_neutral_end:
            return None
        if self._neutral_end_ids is None or self._neutral_end_ids.device != device:
            ends = set(end_token_ids(self.accelerator.unwrap_model(self.model), self._tokenizer))
            if self._assistant_markers is not None:
                ends.add(self._assistant_markers.end)
            self._neutral_end_ids = torch.tensor(sorted(ends), dtype=torch.long, device=device)
        return self._neutral_end_ids

    # Saving and resuming

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Trainer's `save_model`, plus the NADO model in `nado/`. The folder's save record is removed first and
        written last, with an id the NADO folder also holds: a save killed halfway leaves the two unmatched, and
        `NADOModel.from_pretrained` then refuses the NADO model instead of pairing it with a model it does not belong
        to."""
        folder = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            remove_save_record(folder)
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            if not _internal_call:
                # The final model goes with the newest NADO model
                self._finish_pending_phase(install=True)
            nado_dir = os.path.join(folder, NADO_DIR)
            record = new_save_record()
            self.nado.save_pretrained(nado_dir)
            write_save_record(nado_dir, record)
            if not _internal_call:
                # A final model gets the CADET model card, not PEFT's blank template
                self.create_model_card()
                if os.path.abspath(folder) != os.path.abspath(self.args.output_dir):
                    shutil.copy(os.path.join(self.args.output_dir, "README.md"), os.path.join(folder, "README.md"))
            write_save_record(folder, record)

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card, plus what CADET did (λ, oracles, rounds, NADO model) and how to load the NADO model."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        oracles = ", ".join(oracle_name(o) for o in self.oracle_funcs)
        repo = self.hub_model_id or self.args.output_dir
        below = self.args.cadet_demote_below
        share = "" if below == 1 else f"{below:g} · "
        demote = f", lowering only those with R below {share}their mean" if self.args.cadet_demote_only else ""
        if self.args.cadet_safe_ratio < 1:
            demote += f", R capped at {self.args.cadet_safe_ratio:g} · the safest one's"
        if self.args.cadet_neutral_end:
            demote += ", the end-of-turn and EOS tokens left at p"
        section = f"""
## CADET

This model was fine-tuned with CADET (attribute-controlled fine-tuning, [arXiv 2410.05559](https://huggingface.co/papers/2410.05559)):
the SFT loss on the corpus plus λ · KL(q ‖ p), where q, the closest distribution to the model that satisfies the
constraint, comes from an auxiliary NADO model trained on the model's own samples labelled by the oracles.

- oracles: {oracles}; λ: {self.cadet_lambda:g} (`lambda_schedule="{self.args.lambda_schedule}"`, started at
  {self.args.cadet_lambda:g}; q reweights the tokens with p >= {self.args.cadet_min_p:g} · max p{demote}); rounds:
  {self.current_round + 1} of {self.args.steps_per_round} steps (`round_schedule="{self.args.round_schedule}"`); oracle
  calls: {self.oracle_calls}
- NADO model: `{self.nado.config.head}` head, in `{NADO_DIR}/` beside the model

Load the model with its NADO model (for NADO-guided decoding, or to continue training with
`nado_model_name_or_path`):

```python
from transformers import AutoModelForCausalLM
from trl_cadet import NADOLogitsProcessor, NADOModel

model = AutoModelForCausalLM.from_pretrained("{repo}")
nado = NADOModel.from_pretrained("{repo}", subfolder="{NADO_DIR}")
# outputs = model.generate(**inputs, logits_processor=[NADOLogitsProcessor(model, nado)], do_sample=True)
```
"""
        with open(os.path.join(self.args.output_dir, "README.md"), "a") as f:
            f.write(section)

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        # While `_save_checkpoint` runs, Trainer writes `checkpoint-N` into the staging folder instead
        return os.path.join(run_dir, STAGING_DIR) if getattr(self, "_staging", False) else run_dir

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if getattr(self, "_staging", False):
            return  # pushed by `_save_checkpoint` once the checkpoint is complete and in its place
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint plus the CADET state, written to a staging folder and renamed to `checkpoint-N` when
        complete, so that a run killed while saving leaves the previous checkpoints as they were."""
        # A background phase is finished (not installed) first, so the checkpoint holds both NADO models
        self._finish_pending_phase(install=False)
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(run_dir, STAGING_DIR, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        if self.args.should_save:
            self._save_cadet_state(staged)
            if self.state.best_model_checkpoint == staged:  # Trainer records where it found the best checkpoint
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process's files (RNG states, weight shards) are written
        if self.args.should_save:
            publish(staged, final)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        if self.args.push_to_hub:
            super()._push_from_checkpoint(final)
        self.accelerator.wait_for_everyone()

    def _save_cadet_state(self, output_dir: str) -> None:
        torch.save(self.nado_optimizer.state_dict(), os.path.join(output_dir, NADO_OPTIMIZER_NAME))
        pending = self._finished_phase  # a running phase was waited for by `_save_checkpoint`
        if pending is not None:
            self._nado_train.save_pretrained(os.path.join(output_dir, PENDING_NADO_DIR))
        state = {
            "cadet_lambda": self.cadet_lambda,
            "current_round": self.current_round,
            "nado_source_round": self.nado_source_round,
            "oracle_calls": self.oracle_calls,
            "omega_scale": self._omega_scale,
            "latest_samples": self._latest_samples.to_dict(),
            "corpus_samples": None if self._corpus_samples is None else self._corpus_samples.to_dict(),
            "corpus_scores": self._corpus_scores,
            "corpus_violations": self._corpus_violations,
            "rollout_prefixes": None if self._rollout_prefixes is None else self._rollout_prefixes.to_dict(),
            "filtered_corpus": self._filtered_corpus,
            # The arguments a resumed run compares its own with, to warn about a change
            "args": {
                name: getattr(self.args, name) for name in ("cadet_lambda", "lambda_schedule", "steps_per_round")
            },
            "pending": None
            if pending is None
            else {
                "round": pending.round,
                "samples": pending.samples.to_dict(),
                "metrics": pending.metrics,
                "satisfaction": pending.satisfaction,
            },
        }
        write_cadet_state(output_dir, state)

    def _resume_files(self) -> tuple[str, ...]:
        """Trainer's files a checkpoint of this run must hold to resume as it was."""
        if self.args.save_only_model:
            return ()
        rng = f"rng_state_{self.args.process_index}.pth" if self.accelerator.num_processes > 1 else "rng_state.pth"
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # they save the optimiser in their own layout
            return (rng,)
        return ("optimizer.pt", "scheduler.pt", rng)

    def _load_cadet_state(self, checkpoint: str) -> None:
        state_file = os.path.join(checkpoint, CADET_STATE_NAME)
        if not os.path.exists(checkpoint):
            raise ValueError(
                f"`resume_from_checkpoint={checkpoint!r}` does not exist. Pass the path of a `checkpoint-N` folder, or "
                "`resume_from_checkpoint=True` for the newest intact one in `output_dir`."
            )
        if not os.path.isfile(state_file):
            raise ValueError(
                f"{checkpoint} has no {CADET_STATE_NAME}: it was not written by CADETTrainer, or its save was cut "
                "short. Resume from another checkpoint."
            )
        problem = checkpoint_problem(checkpoint, self._resume_files())
        if problem is not None:
            raise ValueError(
                f"Cannot resume from {checkpoint}: {problem}. Resume from an older checkpoint, or pass "
                "`resume_from_checkpoint=True` to take the newest intact one."
            )
        state = read_cadet_state(checkpoint)
        loaded = NADOModel.from_pretrained(os.path.join(checkpoint, NADO_DIR))
        self.nado.load_state_dict(loaded.state_dict())
        pending = state["pending"]
        if pending is not None:
            trained = NADOModel.from_pretrained(os.path.join(checkpoint, PENDING_NADO_DIR))
            self._nado_train.load_state_dict(trained.state_dict())
            self._finished_phase = PhaseResult(
                round=pending["round"],
                samples=Samples(**pending["samples"]),
                metrics=pending["metrics"],
                satisfaction=pending["satisfaction"],
            )
        elif self._nado_train is not self.nado:
            self._nado_train.load_state_dict(self.nado.state_dict())
        optimizer_state = torch.load(
            os.path.join(checkpoint, NADO_OPTIMIZER_NAME), map_location=self._oracle_device, weights_only=True
        )
        self.nado_optimizer.load_state_dict(optimizer_state)
        self.cadet_lambda = state["cadet_lambda"]
        self._reconcile_args(state)
        self.current_round = state["current_round"]
        self.nado_source_round = state["nado_source_round"]
        self.oracle_calls = state["oracle_calls"]
        self._latest_samples = Samples(**state["latest_samples"])
        scale = state.get("omega_scale")  # absent from checkpoints of older versions: measured again
        self._omega_scale = None if scale is None else (int(scale[0]), float(scale[1]))
        corpus = state.get("corpus_samples")
        self._corpus_samples = None if corpus is None else Samples(**corpus)
        self._corpus_scores = dict(state.get("corpus_scores", {}))  # absent from checkpoints of older versions
        self._corpus_violations = dict(state.get("corpus_violations", {}))
        prefixes = state.get("rollout_prefixes")  # absent from checkpoints of older versions
        self._rollout_prefixes = None if prefixes is None else RolloutPrefixes(**prefixes)

    def _reconcile_args(self, state: dict[str, Any]) -> None:
        """As in `Trainer`, the arguments of the resumed run win, except for state that must continue: warn about each
        change that matters."""
        saved = state.get("args", {})  # absent from checkpoints of older versions
        if self.args.lambda_schedule == "constant" and self.args.cadet_lambda != self.cadet_lambda:
            logger.warning(
                "`cadet_lambda` is %s but the checkpoint trained with λ = %s; with `lambda_schedule='constant'` the new "
                "value is used from here on.",
                self.args.cadet_lambda,
                self.cadet_lambda,
            )
            self.cadet_lambda = self.args.cadet_lambda
        elif self.args.lambda_schedule == "adaptive" and saved.get("cadet_lambda", self.args.cadet_lambda) != (
            self.args.cadet_lambda
        ):
            logger.warning(
                "`cadet_lambda` changed from %s to %s since the checkpoint, but with `lambda_schedule='adaptive'` λ is "
                "training state: the run continues from the checkpoint's λ = %s. To restart λ from `cadet_lambda`, "
                "start a new run from the checkpoint's weights instead of resuming.",
                saved["cadet_lambda"],
                self.args.cadet_lambda,
                self.cadet_lambda,
            )
        # Absent from checkpoints of older versions
        if "filtered_corpus" in state and state["filtered_corpus"] != self._filtered_corpus:
            self._warn_filter_changed(state["filtered_corpus"])
        if saved.get("steps_per_round", self.args.steps_per_round) != self.args.steps_per_round:
            with open(os.path.join(self._resume_path, TRAINER_STATE_NAME)) as f:
                step = json.load(f)["global_step"]
            logger.warning(
                "`steps_per_round` changed from %d to %d since the checkpoint; the new value is used. Rounds are "
                "counted as `global_step // steps_per_round`, so the round index jumps from %d to %d at step %d.",
                saved["steps_per_round"],
                self.args.steps_per_round,
                state["current_round"],
                step // self.args.steps_per_round,
                step,
            )

    def _warn_filter_changed(self, saved: dict[str, Any] | None) -> None:
        """The checkpoint's LM loss learned other corpus examples than this run's will: say which, and why it matters."""
        now = self._filtered_corpus
        if saved is None:
            before = "trained on the whole corpus"
        else:
            before = f"trained on the {saved['kept']} of {saved['of']} corpus examples the oracles then kept"
        if now is None:
            after = "the whole corpus (`filter_corpus=False`)"
        else:
            after = f"the {now['kept']} of {now['of']} the oracles keep now"
        logger.warning(
            "The checkpoint %s; the resumed run trains on %s, so its data differ from the interrupted run's from here "
            "on. With the same `filter_corpus`, corpus and `oracle_threshold`, an oracle that scores the same text "
            "differently from call to call causes this.",
            before,
            after,
        )

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if self.args.should_save:
            # What a run killed while saving left behind; never a complete checkpoint
            shutil.rmtree(os.path.join(self.args.output_dir, STAGING_DIR), ignore_errors=True)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir, self._resume_files())
            if resume_from_checkpoint is None:
                raise ValueError(
                    f"No complete checkpoint found in {self.args.output_dir} to resume from. Pass the path of a "
                    "checkpoint, or train without `resume_from_checkpoint`."
                )
        if resume_from_checkpoint:
            self._resume_path = resume_from_checkpoint
            self._load_cadet_state(resume_from_checkpoint)
        self._stop_phase.clear()
        stopping = False
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except BaseException:
            # Ctrl-C or an error: end a background phase at its next check instead of waiting for it to finish (a
            # hung oracle would never let go); the checkpoints already written are complete
            stopping = True
            self._stop_phase.set()
            raise
        finally:
            if self._running_phase is not None:
                # Never leave a thread writing into the NADO model behind
                if not stopping:
                    self._running_phase.result()
                else:
                    wait([self._running_phase])
                    if isinstance(self._running_phase.exception(), OraclePhaseStopped):
                        self._running_phase = None
