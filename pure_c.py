import sys; sys.path.insert(0, '/tmp/w/rev5/tests')
import torch, fnlit
torch.set_num_threads(1)
from helpers import mlp, batch, hand_step
from fnlit.testing import assert_pure, assert_no_host_sync
model = mlp(dropout=0.1)
st = fnlit.TrainState.create(model, fnlit.optim.adamw(1e-2), seed=0)
for mode in ("eager", "default"):
    c = fnlit.compile(hand_step(model), mode=mode)
    try:
        assert_pure(c, st, batch()); print(mode, "pure ok")
    except AssertionError as e:
        print(mode, "FAIL", str(e)[:300])
