"""NADO quality per oracle call: how well each NADO head, trained on one oracle phase's data, predicts the constraint.

On the demo's set-up (SmolLM2-135M-Instruct, the demo corpus, the offline Jigsaw oracle), one oracle phase of round 0
is run once: `prompts_per_round x num_generations` completions of the policy, labelled, plus (for the `+corpus` rows)
`nado_corpus_samples` corpus completions labelled once. Each NADO variant is trained on that data with the demo's NADO
settings, then scored on held-out data no variant saw:

- AUC corpus: AUC of `R(x, y)` (at the reply's last token) on held-out corpus replies, toxic against benign, labelled
  by the oracle;
- AUC policy: the same on a fresh batch of the policy's samples (another seed); Brier: the mean squared error of that
  `R(x, y)` against the (soft) labels (calibration; printed beside the score of the base rate alone);
- log q/p first insult, benign: the mean of `log q(y_t) - log p(y_t)` (what the regulariser pushes on) at the first
  toxic word of each held-out toxic reply, and over the tokens of held-out benign replies; the first should be well
  below 0, the second near 0;
- train s: the phase's NADO training time (the policy's forward pass over the samples included).

Also printed: the share of Ω's positions that fall outside assistant replies on a batch of the demo corpus, under the
old rule (every trained-on token) and the current one (assistant tokens only).

    python benchmarks/nado_probe.py                      # SmolLM2 (offline), about 10 minutes on 2 CPU cores
    python benchmarks/nado_probe.py --model tiny         # the tests' tiny Llama, a smoke run
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {  # name: (NADOConfig head and rank, whether corpus completions are added)
    "full": ("full", 0, False),
    "full +corpus": ("full", 0, True),
    "tied r0": ("tied", 0, False),
    "tied r0 +corpus": ("tied", 0, True),
    "tied r16": ("tied", 16, False),
    "tied r16 +corpus": ("tied", 16, True),
}


def auc(scores: list[float], labels: list[float]) -> float:
    positive = [s for s, label in zip(scores, labels, strict=True) if label >= 0.5]
    negative = [s for s, label in zip(scores, labels, strict=True) if label < 0.5]
    if not positive or not negative:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in positive for n in negative)
    return wins / (len(positive) * len(negative))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--lr", type=float, default=1e-3, help="The NADO learning rate (the library's default: 1e-3).")
    parser.add_argument("--json", default=None, help="Also write the table here.")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from demo import DEMO_CORPUS_KWARGS, build_detox_corpus
    from demo.templates import TOXIC_WORDS
    from round_cost import demo_module, tiny_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_cadet import NADOModel
    from trl_cadet.data_utils import assistant_markers, assistant_token_mask, extract_completions
    from trl_cadet.modeling_nado import NADOConfig
    from trl_cadet.nado import target_logprobs
    from trl_cadet.oracle_phase import (
        Samples,
        collate_samples,
        label_samples,
        output_embedding_weight,
        train_nado,
    )
    from trl_cadet.oracles import load_oracle
    from trl_cadet.sampling import sample_completions, tokenize_prompts

    defaults = demo_module().DEMO_DEFAULTS
    if args.model == "smollm2":
        from demo import smollm2_path

        path = smollm2_path()
        sizes = dict(prompts=defaults["prompts_per_round"], generations=defaults["num_generations"], corpus=256)
    else:
        path = tiny_model_path(tempfile.mkdtemp())
        sizes = dict(prompts=4, generations=2, corpus=8)
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    oracle = load_oracle("jigsaw")
    corpus = build_detox_corpus(**DEMO_CORPUS_KWARGS)
    threshold, max_len = 0.5, defaults["max_completion_length"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def label(prompts, prompt_ids, completion_ids, generations) -> Samples:
        result = label_samples(
            [oracle], prompts, prompt_ids, completion_ids, tokenizer, generations, None, "soft", threshold, 2
        )
        return result.samples

    def policy_samples(seed: int) -> Samples:
        prompts = list(corpus["oracle"]["prompt"])[: sizes["prompts"]]
        prompt_ids = tokenize_prompts(prompts, tokenizer)
        completions = sample_completions(
            policy, tokenizer, prompt_ids, sizes["generations"], max_len, 1.0, 1.0, 32, seed=seed
        )
        return label(prompts, prompt_ids, completions, sizes["generations"])

    start = time.perf_counter()
    train_samples = policy_samples(seed=defaults["seed"])
    heldout_policy = policy_samples(seed=defaults["seed"] + 1)
    # Corpus completions for training, and held-out corpus replies (other rows: the training draw is seeded)
    train_split = corpus["train"]
    drawn = extract_completions(train_split, tokenizer, sizes["corpus"], max_len, 16, seed=defaults["seed"])
    corpus_samples = label(drawn.prompts, drawn.prompt_ids, drawn.completion_ids, 1)
    used = {tuple(ids) for ids in drawn.completion_ids}
    rest = extract_completions(train_split, tokenizer, len(train_split), max_len, 16, seed=defaults["seed"] + 7)
    keep = [i for i, ids in enumerate(rest.completion_ids) if tuple(ids) not in used][: max(16, sizes["corpus"] // 4)]
    heldout_corpus = label(
        [rest.prompts[i] for i in keep],
        [rest.prompt_ids[i] for i in keep],
        [rest.completion_ids[i] for i in keep],
        1,
    )
    oracle_calls = len(train_samples) + len(heldout_policy)
    print(
        f"data: {len(train_samples)} policy samples ({sum(s < 0.5 for s in train_samples.labels)} unsatisfied), "
        f"{len(corpus_samples)} corpus completions ({sum(s < 0.5 for s in corpus_samples.labels)} unsatisfied); "
        f"held out: {len(heldout_policy)} policy samples, {len(heldout_corpus)} corpus replies "
        f"({sum(s < 0.5 for s in heldout_corpus.labels)} toxic); {time.perf_counter() - start:.0f} s"
    )
    toxic_word = re.compile(r"\b(" + "|".join(map(re.escape, TOXIC_WORDS)) + r")", re.IGNORECASE)

    @torch.no_grad()
    def score(nado, samples: Samples):
        """R(x, y) at the last token of each completion, and log q/p at the first toxic word / benign tokens."""
        embeddings = output_embedding_weight(policy)
        r_last, first_insult, benign = [], [], []
        for start in range(0, len(samples), 16):
            prompts = samples.prompt_ids[start : start + 16]
            completions = samples.completion_ids[start : start + 16]
            batch = collate_samples(prompts, completions, pad, "cpu")
            out = policy(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
            r = nado(out.hidden_states[-1], output_embeddings=embeddings)
            log_q_over_p = target_logprobs(out.logits, r) - torch.log_softmax(out.logits.float(), -1)
            for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
                positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)  # predicting completion tokens
                tokens = batch["input_ids"][row]
                r_last.append(r[row, positions[-1], tokens[positions[-1] + 1]].item())
                gaps = [log_q_over_p[row, t, tokens[t + 1]].item() for t in positions]
                if samples.labels[start + row] >= 0.5:
                    benign.extend(gaps)
                    continue
                text = ""
                for t, gap in zip(positions, gaps, strict=True):
                    text += tokenizer.decode(tokens[t + 1 : t + 2])
                    if toxic_word.search(text):
                        first_insult.append(gap)
                        break
        return r_last, first_insult, benign

    rows = []
    for name in args.variants.split(","):
        head, rank, with_corpus = VARIANTS[name]
        text_config = policy.config.get_text_config()
        config = NADOConfig(
            hidden_size=text_config.hidden_size,
            vocab_size=policy.get_output_embeddings().weight.shape[0],
            head=head,
            rank=rank,
        )
        torch.manual_seed(0)
        nado = NADOModel(config)
        optimizer = torch.optim.AdamW(nado.parameters(), lr=args.lr)
        begin = time.perf_counter()
        train_nado(
            policy,
            nado,
            optimizer,
            train_samples,
            pad,
            epochs=defaults["nado_epochs"],
            batch_size=defaults["nado_batch_size"],
            consistency_weight=1.0,
            seed=0,
            extra_samples=corpus_samples if with_corpus else None,
        )
        seconds = time.perf_counter() - begin
        nado.eval()
        corpus_r, first_insult, benign = score(nado, heldout_corpus)
        policy_r, _, _ = score(nado, heldout_policy)
        probabilities = torch.sigmoid(torch.tensor(policy_r))
        brier = ((probabilities - torch.tensor(heldout_policy.labels)) ** 2).mean().item()
        mean = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
        rows.append(
            {
                "variant": name,
                "oracle calls": len(train_samples) + (len(corpus_samples) if with_corpus else 0),
                "AUC corpus": auc(corpus_r, heldout_corpus.labels),
                "AUC policy": auc(policy_r, heldout_policy.labels),
                "Brier": brier,
                "log q/p first insult": mean(first_insult),
                "log q/p benign": mean(benign),
                "train s": seconds,
            }
        )
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()))
    base_rate = mean(heldout_policy.labels)
    base_brier = mean([(base_rate - label) ** 2 for label in heldout_policy.labels])
    print(f"\nBrier of the base rate alone: {base_brier:.3f}; held-out oracle calls {oracle_calls}")

    # Share of Ω outside assistant replies on a batch of the corpus, old rule against the current one
    markers = assistant_markers(tokenizer)
    texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in corpus["train"]["messages"][:64]]
    ids = [tokenizer(text=t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    real = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]).bool()
    assistant = assistant_token_mask(input_ids, markers) & real
    outside = 1 - (assistant[:, 1:].sum() / real[:, 1:].sum()).item()
    print(f"share of Ω outside assistant replies: old rule (every trained token) {outside:.2f}, current rule 0.00")

    header = list(rows[0])
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        table.append(
            "| " + " | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in header) + " |"
        )
    print("\n".join(table))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "omega_outside_old_rule": outside}, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
