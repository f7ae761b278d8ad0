"""A transformer text classifier: AdamW without decay on biases and LayerNorm weights, warmup + cosine.

The Lightning text-classification tutorials fine-tune a Hugging Face model with AdamW, a parameter
group without weight decay for biases and LayerNorm weights, and a linear-warmup schedule. Here:

* `fnlit.optim.adamw(schedule, weight_decay=0.01, mask=fnlit.optim.decay_mask)`: the mask is the
  parameter groups (False, no decay, for biases and every 1-d tensor such as LayerNorm weights);
* `fnlit.optim.warmup_cosine(peak, warmup_steps, decay_steps)`: linear warmup, then cosine decay; the
  rate lives in the optimizer state as a tensor, and `LearningRateMonitor` logs it to TensorBoard;
* the model is a small encoder built from `torch.nn.TransformerEncoder` (`--model torch`, default) or,
  with the `transformers` package installed, a BERT built from a `BertConfig` (`--model hf`): the
  architecture only, randomly initialised, nothing is downloaded. The training step is the same.

Data: synthetic movie reviews from a small vocabulary, generated from a seed. Each clause is
`<subject> <verb> [not] [very] <adjective>`; `not` flips the adjective's sentiment, and in
`<clause> but <clause>` the second clause decides. Filler phrases contain `not` too ("i can not lie"),
so counting words is not enough: a bag-of-words logistic regression (printed as the baseline) stays
well below what the transformer, which sees word order, reaches.

    python examples/text_classifier.py                  # ~20 s on 2 CPU cores
    python examples/text_classifier.py --model hf       # needs `pip install transformers`
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F
from torch import nn

import fnlit
from fnlit.data import ArrayLoader

SUBJECTS = ["the movie", "the film", "this show", "the plot", "the acting", "the cast", "the ending", "the script"]
VERBS = ["was", "is", "seemed", "felt", "looked"]
INTENSIFIERS = ["very", "really", "quite", "truly"]
POSITIVE = ["good", "great", "wonderful", "fun", "brilliant", "moving", "clever", "charming"]
NEGATIVE = ["bad", "boring", "awful", "dull", "terrible", "weak", "silly", "bland"]
FILLERS = ["i can not lie ,", "whether or not you agree ,", "to be honest ,", "not going to spoil it ,", "in short ,"]
MAX_LEN = 24
PAD = 0


def clause(rng: random.Random) -> str:
    """``<subject> <verb> [not] [very] <adjective>``."""
    words = [rng.choice(SUBJECTS), rng.choice(VERBS)]
    if rng.random() < 0.4:
        words.append("not")
    if rng.random() < 0.3:
        words.append(rng.choice(INTENSIFIERS))
    words.append(rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE))
    return " ".join(words)


def review(rng: random.Random) -> str:
    """An optional filler, a clause, and sometimes ``but`` and a second clause."""
    text = clause(rng)
    if rng.random() < 0.4:
        text = f"{text} but {clause(rng)}"
    if rng.random() < 0.3:
        text = f"{rng.choice(FILLERS)} {text}"
    return text


def sentiment(text: str) -> int:
    """The label (1 positive, 0 negative): the deciding clause's adjective, flipped by a ``not`` in that clause."""
    deciding = text.split(" but ")[-1].split(",")[-1].split()  # after "but", and after any filler
    return int((deciding[-1] in POSITIVE) != ("not" in deciding))


def vocabulary() -> dict[str, int]:
    """Every word the generator can produce, with id 0 kept for padding."""
    phrases = SUBJECTS + VERBS + INTENSIFIERS + POSITIVE + NEGATIVE + FILLERS + ["not", "but"]
    return {w: i + 1 for i, w in enumerate(sorted({w for phrase in phrases for w in phrase.split()}))}


def encode(texts: list[str], vocab: dict[str, int]) -> torch.Tensor:
    """Token ids, right-padded with 0 to MAX_LEN."""
    ids = torch.full((len(texts), MAX_LEN), PAD, dtype=torch.int64)
    for i, text in enumerate(texts):
        tokens = [vocab[w] for w in text.split()][:MAX_LEN]
        ids[i, : len(tokens)] = torch.tensor(tokens)
    return ids


def dataset(
    n: int, seed: int, vocab: dict[str, int], exclude: frozenset[str] | set[str] = frozenset()
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` reviews from ``seed``, none of whose texts is in ``exclude``: token ids, labels and the texts."""
    rng = random.Random(seed)
    texts: list[str] = []
    while len(texts) < n:  # (the grammar has few enough reviews that independent draws repeat some)
        text = review(rng)
        if text not in exclude:
            texts.append(text)
    return encode(texts, vocab), torch.tensor([sentiment(t) for t in texts]), texts


def splits(train_size: int, seed: int, vocab: dict[str, int]) -> tuple[tuple, tuple, tuple]:
    """Training, validation (500) and test (1000) reviews, from three streams of the generator: a text drawn for
    training is left out of validation and test, one drawn for validation out of test (the grammar has few
    enough reviews that about a fifth of them would repeat a training text word for word). So the test measures
    reviews never seen, and leans to the longer, rarer ones: two-clause reviews are ~52 % of it against ~40 % of an
    independent draw (the short ones repeat most)."""
    train = dataset(train_size, seed, vocab)
    val = dataset(500, seed + 1, vocab, exclude=set(train[2]))
    return train, val, dataset(1000, seed + 2, vocab, exclude=set(train[2]) | set(val[2]))


class TransformerClassifier(nn.Module):
    """Token and position embeddings, a pre-norm transformer encoder, mean pooling over the real tokens."""

    def __init__(self, vocab_size: int, dim: int = 64, heads: int = 4, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.positions = nn.Embedding(MAX_LEN, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout, batch_first=True, norm_first=True)
        # enable_nested_tensor=False: the nested-tensor fast path does not apply to pre-norm layers, and
        # asking for it only produces a warning.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = ids == PAD
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class HFClassifier(nn.Module):
    """A Hugging Face BERT for sequence classification, built from a config (random weights, no download)."""

    def __init__(self, vocab_size: int, dim: int = 64, heads: int = 4, layers: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * dim, max_position_embeddings=MAX_LEN, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, num_labels=2, pad_token_id=PAD,
        )  # fmt: skip
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=ids, attention_mask=(ids != PAD).long()).logits


def bag_of_words_accuracy(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], vocab_size: int) -> float:
    """The order-blind baseline: logistic regression on word counts."""
    from sklearn.linear_model import LogisticRegression

    def counts(ids: torch.Tensor) -> torch.Tensor:
        return F.one_hot(ids, vocab_size).sum(1)[:, 1:].float()  # column 0 counts padding

    clf = LogisticRegression(max_iter=2000).fit(counts(train[0]).numpy(), train[1].numpy())
    return float(clf.score(counts(test[0]).numpy(), test[1].numpy()))


Batch = tuple[torch.Tensor, torch.Tensor]


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["torch", "hf"], default="torch")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--train-size", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps spent warming up")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="runs/text_classifier", help="TensorBoard event files and metrics.csv ('' for none)")
    args = p.parse_args(argv)

    if args.model == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            p.error("--model hf needs the transformers package: pip install transformers (nothing is downloaded)")

    vocab = vocabulary()
    train, val, test = splits(args.train_size, args.seed, vocab)
    torch.manual_seed(args.seed)
    model = (HFClassifier if args.model == "hf" else TransformerClassifier)(len(vocab) + 1, args.dim, layers=args.layers)

    def train_step(state: fnlit.TrainState, batch: Batch) -> tuple[fnlit.TrainState, dict[str, torch.Tensor]]:
        ids, y = batch

        def loss_fn(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            logits, _ = fnlit.apply(model, params, state.buffers, ids, rng=state.rng)  # dropout from state.rng
            return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

        (loss, acc), grads = fnlit.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads), {"loss": loss, "acc": acc}

    def eval_step(state: fnlit.TrainState, batch: Batch) -> dict[str, torch.Tensor]:
        ids, y = batch
        logits, _ = fnlit.apply(model, state.params, state.buffers, ids, train=False)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(-1) == y).float().mean()}

    loader = ArrayLoader(train[0], train[1], batch_size=args.batch_size, shuffle=True, drop_last=True)
    total = args.max_steps or args.epochs * len(loader)
    if total < 1:  # (the schedule needs steps to warm up and decay over)
        p.error(f"no training step to take: {len(loader)} batches an epoch, --epochs {args.epochs}. Use a smaller "
                "--batch-size or more --epochs.")
    schedule = fnlit.optim.warmup_cosine(args.lr, warmup_steps=min(max(1, int(args.warmup * total)), total - 1), decay_steps=total)
    # decay_mask: no weight decay on biases and LayerNorm weights (every tensor with fewer than 2 dims),
    # the parameter groups of the Lightning/Hugging Face recipe.
    tx = fnlit.optim.adamw(schedule, weight_decay=args.weight_decay, mask=fnlit.optim.decay_mask)
    state = fnlit.TrainState.create(model, tx, seed=args.seed)

    start = time.perf_counter()
    state = fnlit.fit(
        train_step, state, loader, val_data=ArrayLoader(val[0], val[1], batch_size=500, shuffle=False),
        eval_step=eval_step, max_epochs=args.epochs, max_steps=args.max_steps, log_every_n_steps=10,
        callbacks=[fnlit.callbacks.LearningRateMonitor()], log_dir=args.log_dir or None,
        hparams=vars(args), progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    result = fnlit.evaluate(eval_step, state, ArrayLoader(test[0], test[1], batch_size=500, shuffle=False))
    result = {"test_acc": result["acc"], "test_loss": result["loss"],
              "bag_of_words_acc": bag_of_words_accuracy(train[:2], test[:2], len(vocab) + 1)}  # fmt: skip
    print(
        f"test accuracy {result['test_acc']:.4f} (bag of words: {result['bag_of_words_acc']:.4f}, chance: 0.5)  "
        f"({args.model} model, {int(state.step)} steps, {seconds:.1f} s)"
    )
    with torch.no_grad():
        model = fnlit.export(state, model)  # trained weights into the module, eval mode: plain inference
        for text in ["the movie was not bad", "the movie was good but the ending was not good", "i can not lie , the cast was fun"]:
            p_pos = model(encode([text], vocab)).softmax(-1)[0, 1].item()
            print(f"  {p_pos:.2f} positive: {text}")
    return result


if __name__ == "__main__":
    main()
