"""Train / fine-tune and evaluate loops: CPU, deterministic for a given seed, tqdm bars (optional).

Models still carrying prune masks train as usual: the masks keep pruned weights at zero.
"""
from __future__ import annotations

import contextlib
import io
import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


def train(model: nn.Module, dataset: Dataset, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 64,
          weight_decay: float = 0.0, seed: int = 0, progress: bool = True, desc: str = "train") -> list[dict]:
    """Adam on cross-entropy for `epochs` passes over a seeded shuffle of `dataset`; returns
    [{'epoch', 'loss', 'accuracy'}] per epoch. Leaves the model in eval mode."""
    if epochs < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"train: need epochs >= 0, batch_size >= 1, lr > 0 (got {epochs}, {batch_size}, {lr})")
    torch.manual_seed(seed)  # dropout and any other randomness inside the model
    generator = torch.Generator().manual_seed(seed)
    # A last batch of one sample breaks BatchNorm in training mode ("more than 1 value per channel").
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                        drop_last=len(dataset) % batch_size == 1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    history = []
    model.train()
    try:
        for epoch in range(1, epochs + 1):
            seen, correct, loss_sum = 0, 0, 0.0
            bar = tqdm(loader, desc=f"{desc} {epoch}/{epochs}", disable=not progress, leave=False, unit="batch")
            for inputs, labels in bar:
                optimizer.zero_grad(set_to_none=True)
                logits = model(inputs)
                loss = F.cross_entropy(logits, labels)
                loss.backward()
                optimizer.step()
                seen += len(labels)
                loss_sum += loss.item() * len(labels)
                correct += int((logits.argmax(1) == labels).sum())
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            history.append({"epoch": epoch, "loss": loss_sum / max(seen, 1), "accuracy": correct / max(seen, 1)})
    finally:
        model.eval()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 256, progress: bool = True,
             desc: str = "eval") -> dict:
    """{'loss', 'accuracy', 'n', 'predictions'} of the model in eval mode (its mode is restored after)."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    seen, correct, loss_sum, predictions = 0, 0, 0.0, []
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, unit="batch")
    try:
        for inputs, labels in bar:
            logits = model(inputs)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            predicted = logits.argmax(1)
            predictions.append(predicted)
            correct += int((predicted == labels).sum())
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    finally:
        model.train(was_training)
    return {"loss": loss_sum / seen if seen else math.nan, "accuracy": correct / seen if seen else math.nan,
            "n": seen, "predictions": torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)}


def check_input_fits(model: nn.Module, dataset: Dataset, what: str = "model") -> None:
    """ValueError (not a torch RuntimeError from deep inside) when the model cannot take the dataset's
    inputs, e.g. a 3-channel CIFAR network on 1x8x8 digits."""
    if len(dataset) == 0:
        raise ValueError(f"{what}: the dataset is empty")
    inputs, _ = dataset[0]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), forward_errors(f"{what} does not accept this dataset's inputs of shape "
                                             f"{tuple(inputs.shape)}"):
            model(inputs.unsqueeze(0))
    finally:
        model.train(was_training)


@contextlib.contextmanager
def forward_errors(what: str):
    """Turn a failing model call into ValueError('<what>: <the innermost error message>').

    Wrappers such as torch.fx interpreters re-raise a layer's clear ValueError as a generic
    RuntimeError (and print a traceback to stderr); the user sees the original message instead."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"{what}: {innermost_message(exc)}") from exc
    sys.stderr.write(captured.getvalue())  # a successful call's warnings still reach the user


def innermost_message(exc: BaseException) -> str:
    """First line of the deepest exception in the __cause__/__context__ chain."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
