import torch

from trainer.config import validate_config
from trainer.loop import make_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8))


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def test_adafactor_trains_with_factored_state_smaller_than_adamw():
    sizes = {}
    for name in ("adamw", "adafactor"):
        model = _model()
        cfg = validate_config({"train": {"optimizer": name, "lr": 1e-3}})
        optimizer = make_optimizer(cfg.train, model)
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(4, 32)).pow(2).mean().backward()
        optimizer.step()
        assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        sizes[name] = _state_bytes(optimizer)
    # Adafactor keeps row and column second moments for matrices instead of two full moments.
    assert 0 < sizes["adafactor"] < sizes["adamw"] / 4
