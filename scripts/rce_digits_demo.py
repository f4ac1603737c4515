"""Interim demo: train a small MLP with CE and with RCE on scikit-learn's digits.

Shows the RCE loss in a real training loop and the RCE inference rule (argmin Z).
The full experiment (ResNets, attacks, K-density, report) replaces this with
`rce-fast demo` when the pipeline lands.
"""
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import rce_fast


def main(steps: int = 600, seed: int = 0) -> None:
    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0 - 0.5  # pixels to [-0.5, 0.5]
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed,
                                              stratify=y)
    for objective in ("ce", "rce"):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LeakyReLU(0.1),
                                    torch.nn.Linear(128, 10))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        loss_fn = rce_fast.RCELoss() if objective == "rce" else torch.nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, len(x_tr), (128,), generator=g)
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = model(x_te)
            dec = rce_fast.decision_logits(logits, objective)
            err = (dec.argmax(1) != y_te).float().mean().item() * 100
            conf = dec.softmax(1).max(1).values.mean().item()
        print(f"{objective.upper():>3}: test error {err:5.2f}%  mean confidence {conf:.3f}  "
              f"final loss {loss.item():.4f}  ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
