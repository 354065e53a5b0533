"""NADO training on cached features gives the loss of the plain formulation: the policy's forward pass on the
right-padded prompt + completion batch, `nado_loss` over every position."""

import types

import pytest
import torch

from trl_cadet.modeling_nado import NADOModel
from trl_cadet.nado import nado_loss
from trl_cadet.oracle_phase import (
    Samples,
    _nado_batch,
    collate_samples,
    sample_features,
    snapshot_policy,
    train_nado,
)
from trl_cadet.sampling import sample_completions, tokenize_prompts


def random_samples(vocab_size: int, n: int = 6) -> Samples:
    generator = torch.Generator().manual_seed(0)
    samples = Samples()
    for i in range(n):
        prompt_length, completion_length = 3 + i % 4, 1 + (5 * i) % 7  # ragged on both sides
        samples.prompt_ids.append(torch.randint(3, vocab_size, (prompt_length,), generator=generator).tolist())
        samples.completion_ids.append(torch.randint(3, vocab_size, (completion_length,), generator=generator).tolist())
        samples.scores.append(float(i % 2))
        samples.labels.append(float(i % 2))
    return samples


@pytest.mark.parametrize("num_layers", [0, 1])
@pytest.mark.parametrize("through_head", [True, False])
def test_windowed_features_give_the_full_sequence_loss(tiny_llama, num_layers, through_head):
    model = tiny_llama.eval()
    nado = NADOModel.from_lm(model, num_layers=num_layers, hidden_state_layer=-2)
    with torch.no_grad():  # a NADO model that is not all zeros, so that the loss depends on the positions
        for param in nado.parameters():
            param.add_(0.3 * torch.randn_like(param))
    samples = random_samples(model.config.vocab_size)
    labels = torch.tensor(samples.labels)

    batch = collate_samples(samples.prompt_ids, samples.completion_ids, 0, "cpu")
    with torch.no_grad():
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        expected = nado_loss(
            nado(outputs.hidden_states[-2], batch["attention_mask"], output_embeddings=model.lm_head.weight),
            outputs.logits,
            batch["input_ids"],
            labels,
            batch["completion_mask"],
        )

    features, weights = sample_features(model, nado, samples, pad_token_id=0, batch_size=4)
    assert weights is None
    assert all((f.head_states is not None) == (f.lm_logits is None) for f in features)
    if not through_head:  # as for a model whose logits are not its output embeddings of the last hidden states
        for f in features:
            f.lm_logits, f.head_states = model.get_output_embeddings()(f.head_states), None
    with torch.no_grad():
        nado_logits, lm_logits, tokens, completion_mask = _nado_batch(model, nado, features)
        got = nado_loss(nado_logits, lm_logits, tokens, labels, completion_mask)
    assert completion_mask.sum().item() == sum(len(c) for c in samples.completion_ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("last_labels_only", [0, 3])
def test_corpus_completions_labelled_at_their_last_token_only(tiny_llama, last_labels_only):
    """`nado_corpus_labels="last"`: the first `last_labels_only` extra samples (the corpus completions) count in the
    BCE at their last token only; the policy's samples at every token, and the consistency term everywhere."""
    model = tiny_llama.eval()
    nado = NADOModel.from_lm(model)
    with torch.no_grad():
        for param in nado.parameters():
            param.add_(0.3 * torch.randn_like(param))
    samples, extra = random_samples(model.config.vocab_size), random_samples(model.config.vocab_size, n=5)
    every = Samples()
    for part in (samples, extra):
        every.extend(part)
    batch = collate_samples(every.prompt_ids, every.completion_ids, 0, "cpu")
    label_mask = batch["completion_mask"].clone()
    for row in range(len(samples), len(samples) + last_labels_only):
        last = batch["attention_mask"][row].sum() - 1
        label_mask[row] = 0
        label_mask[row, last] = 1
    with torch.no_grad():
        outputs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        _, bce, consistency = nado_loss(
            nado(outputs.hidden_states[-1], output_embeddings=model.lm_head.weight),
            outputs.logits,
            batch["input_ids"],
            torch.tensor(every.labels),
            batch["completion_mask"],
            return_parts=True,
            label_mask=label_mask,
        )
    frozen = torch.optim.SGD(nado.parameters(), lr=0.0)  # one epoch in one batch, the NADO model unchanged
    metrics = train_nado(
        model, nado, frozen, samples, 0, 1, 16, 1.0, extra_samples=extra, last_labels_only=last_labels_only
    )
    assert metrics["nado/bce"] == pytest.approx(bce.item(), rel=1e-4)
    assert metrics["nado/consistency"] == pytest.approx(consistency.item(), rel=1e-3)  # windows: float rounding
    if last_labels_only:  # the mask changed what was measured, or this case shows nothing
        plain = train_nado(model, nado, frozen, samples, 0, 1, 16, 1.0, extra_samples=extra)
        assert abs(plain["nado/bce"] - bce.item()) > 1e-3


def test_the_lm_head_path_is_taken_when_it_reproduces_the_logits(tiny_llama):
    nado = NADOModel.from_lm(tiny_llama)
    features, _ = sample_features(tiny_llama.eval(), nado, random_samples(tiny_llama.config.vocab_size), 0, 4)
    assert all(f.head_states is not None and f.lm_logits is None for f in features)


def test_importance_weights_come_from_the_same_pass(tiny_llama):
    nado = NADOModel.from_lm(tiny_llama)
    samples = random_samples(tiny_llama.config.vocab_size)
    _, weights = sample_features(tiny_llama.eval(), nado, samples, 0, 4, proposal=(2.0, 1.0))
    assert weights.shape == (len(samples),)
    torch.testing.assert_close(weights.sum(), torch.tensor(float(len(samples))))
    assert weights.std() > 0  # a tempered proposal weights completions unevenly


def test_oracle_phase_prompts_begin_as_the_training_sequences_do(tmp_path):
    """A text corpus: SFTTrainer's sequences begin with BOS, so the prompts the policy is sampled on (and the NADO
    model learns from) must too; a conversation's chat template writes its own special tokens."""
    from conftest import tiny_cadet_config
    from datasets import Dataset
    from test_evaluation import make_model, make_tokenizer

    from trl_cadet import CADETTrainer

    tokenizer = make_tokenizer()
    trainer = CADETTrainer(
        model=make_model(tokenizer),
        oracle_funcs=lambda prompts, completions, **kwargs: [1.0] * len(completions),
        args=tiny_cadet_config(tmp_path, corpus_prompt_length=3, nado_corpus_samples=2),
        train_dataset=Dataset.from_list([{"text": "the quick brown fox jumps over the lazy dog"}] * 4),
        processing_class=tokenizer,
    )
    first_trained_token = trainer.train_dataset[0]["input_ids"][0]
    assert first_trained_token == tokenizer.bos_token_id
    assert all(ids[0] == first_trained_token for ids in trainer.prompt_ids)
    assert all(ids[0] == first_trained_token for ids in trainer._corpus_completions.prompt_ids)
    conversation = [{"role": "user", "content": "hello"}]
    (ids,) = tokenize_prompts([conversation], tokenizer)
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("conversational", [False, True])
def test_evaluation_and_the_oracle_phase_sample_through_one_path(conversational):
    """The same prompts, seed and settings give the evaluation and the oracle phase the same completions: one
    tokenisation (BOS on a text prompt), one padding, one RNG fork, one cut at the end token."""
    from test_evaluation import make_model, make_tokenizer

    from trl_cadet.evaluation import generate_samples

    tokenizer = make_tokenizer()
    model = make_model(tokenizer)
    prompts = ["the quick brown fox", "a lazy dog sat", "hello"]
    if conversational:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    texts = generate_samples(
        model,
        tokenizer,
        prompts,
        num_samples=3,
        max_new_tokens=6,
        top_p=1.0,
        batch_size=4,
        seed=7,
        show_progress=False,
    )
    prompt_ids = tokenize_prompts(prompts, tokenizer)
    if not conversational:  # a chat template writes its own special tokens
        assert all(ids[0] == tokenizer.bos_token_id for ids in prompt_ids)
    completion_ids = sample_completions(model, tokenizer, prompt_ids, 3, 6, 1.0, 1.0, batch_size=4, seed=7)
    decoded = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    assert [text for row in texts for text in row] == decoded
    assert len(set(decoded)) > 1  # sampled, not one greedy answer


def test_the_parallel_snapshot_runs_its_own_weights_under_sftrainers_fused_head(tokenizer):
    """SFTTrainer replaces the model's `forward` with a closure over the original one (its fused LM head); a plain
    `deepcopy` keeps that closure, so the snapshot would run, and sample from, the model being trained."""
    from tiny_llama import build_llama
    from trl.trainer.utils import add_fused_lm_head

    policy = build_llama(tokenizer)
    add_fused_lm_head(policy)
    snapshot = snapshot_policy(policy, "cpu")
    input_ids = torch.tensor([[5, 9, 14, 20, 33]])
    with torch.no_grad():
        before = snapshot(input_ids=input_ids).logits
        for param in policy.parameters():
            param.add_(0.5)  # a training step on the policy, after the snapshot was taken
        after = snapshot(input_ids=input_ids).logits
        unpatched = type(snapshot).forward(snapshot, input_ids=input_ids).logits
        generated = snapshot.generate(input_ids=input_ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(after, unpatched, rtol=0, atol=0)
    assert generated.shape == (1, 8)
    # The snapshot keeps the patch itself (its fused head still works), bound to the snapshot, not to a hidden third
    # copy of the model; a later round's refresh reaches the weights it runs
    assert snapshot.forward.__self__ is snapshot
    inner = [cell.cell_contents for cell in snapshot.forward.__func__.__closure__]
    assert [m.__self__ for m in inner if isinstance(m, types.MethodType)] == [snapshot]  # the original forward's
    fused = snapshot(input_ids=input_ids, labels=input_ids, fused_lm_head=True)
    assert torch.isfinite(fused.loss)
    with torch.no_grad():
        snapshot_policy(policy, "cpu", snapshot)
        torch.testing.assert_close(snapshot(input_ids=input_ids).logits, policy(input_ids=input_ids).logits)


def test_private_rng_sampling_draws_from_the_same_distribution_and_ignores_other_threads(tokenizer, tiny_llama):
    """`private_rng=True` (the parallel schedule's background phase): the warpers of `generate` and a Gumbel-max draw
    from a generator of the call's own. The next token follows the temperature- and top-k-warped softmax, and a thread
    drawing from torch's global RNG meanwhile changes nothing."""
    import threading

    prompt_ids = [tokenizer("hello there")["input_ids"]]
    temperature, top_k, draws = 0.7, 3, 3000
    with torch.no_grad():
        # Peaked enough that the temperature moves the top token by 0.08 and 15% of the mass is outside the top 3
        tiny_llama.lm_head.weight.mul_(20)
        logits = tiny_llama(torch.tensor(prompt_ids)).logits[0, -1] / temperature
    top = logits.topk(top_k)
    expected = torch.softmax(top.values, -1)
    kwargs = dict(max_new_tokens=1, temperature=temperature, top_p=1.0, batch_size=1000, seed=5, top_k=top_k)
    first = sample_completions(tiny_llama, tokenizer, prompt_ids, draws, private_rng=True, **kwargs)
    tokens = torch.tensor([c[0] for c in first])
    assert set(tokens.tolist()) <= set(top.indices.tolist())  # top-k applied
    observed = torch.stack([(tokens == i).float().mean() for i in top.indices])
    assert (observed - expected).abs().max() < 0.03, (observed, expected)  # 3 standard errors at most

    stop = threading.Event()

    def draw_from_the_global_rng():
        while not stop.is_set():
            torch.rand(16)

    thread = threading.Thread(target=draw_from_the_global_rng)
    thread.start()
    try:
        again = sample_completions(tiny_llama, tokenizer, prompt_ids, 8, private_rng=True, **{**kwargs, "top_k": 0})
    finally:
        stop.set()
        thread.join()
    assert again == sample_completions(
        tiny_llama, tokenizer, prompt_ids, 8, private_rng=True, **{**kwargs, "top_k": 0}
    )
    with pytest.raises(ValueError, match="needs a `seed`"):
        sample_completions(tiny_llama, tokenizer, prompt_ids, 1, private_rng=True, **{**kwargs, "seed": None})
