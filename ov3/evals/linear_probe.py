"""Linear probe: multinomial logistic regression on frozen features.

Full-batch L-BFGS (optax) on mean cross-entropy + (l2 / 2) * |W|^2 with an unpenalised
bias, the same objective as scikit-learn's `LogisticRegression(C=1 / (l2 * n))` with
its default lbfgs solver, which CLIP's linear-probe protocol uses. The whole fit is
one jitted `while_loop`, so it runs where the features live (device or host).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ov3.errors import Ov3Error

Params = dict[str, jax.Array]


def _loss(params: Params, x: jax.Array, y: jax.Array, l2: float) -> jax.Array:
    logits = x @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def fit_logistic_regression(x: jax.Array, y: jax.Array, *, num_classes: int,
                            l2: float = 1e-4, max_iters: int = 1000,
                            tol: float = 1e-5) -> tuple[Params, dict[str, jax.Array]]:
    """Minimises mean CE + (l2 / 2) |W|^2 over `W: [D, K], b: [K]` from zeros.

    Stops after `max_iters` L-BFGS steps or when the gradient's L2 norm is below `tol`.
    Returns the parameters and `{"loss", "grad_norm", "iterations"}`.
    """
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.int32)
    fun = functools.partial(_loss, x=x, y=y, l2=l2)
    params = {"w": jnp.zeros((x.shape[1], num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    opt = optax.lbfgs()
    # Reuses the value and gradient the zoom line search already computed.
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad,
                                    value_fn=fun)
        return optax.apply_updates(params, updates), state

    def keep_going(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad = optax.tree_utils.tree_get(state, "grad")
        return (count == 0) | ((count < max_iters) & (optax.tree_utils.tree_norm(grad) >= tol))

    params, state = jax.lax.while_loop(keep_going, step, (params, opt.init(params)))
    info = {"loss": fun(params),
            "grad_norm": optax.tree_utils.tree_norm(jax.grad(fun)(params)),
            "iterations": optax.tree_utils.tree_get(state, "count")}
    return params, info


@jax.jit
def _standardize(train_x: jax.Array, test_x: jax.Array) -> tuple[jax.Array, jax.Array]:
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0) + 1e-6  # constant dimensions stay finite
    return (train_x - mean) / std, (test_x - mean) / std


@jax.jit
def _top1(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(x @ params["w"] + params["b"], axis=-1) == y)


def linear_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any, *,
                 num_classes: Optional[int] = None, l2: float = 1e-4,
                 max_iters: int = 1000, tol: float = 1e-5,
                 standardize: bool = True) -> dict[str, float]:
    """Fits a linear classifier on `train_x: [N, D]` and reports top-1 accuracies.

    Args:
      train_x, train_y, test_x, test_y: features `[N, D]` and int labels `[N]`.
      num_classes: number of classes; defaults to 1 + the largest label seen.
      l2: weight decay on W for the mean loss (sklearn's C = 1 / (l2 * N_train)).
      max_iters, tol: L-BFGS stopping rule (steps; gradient norm).
      standardize: scale features by the train set's per-dimension mean and std,
        which makes l2 comparable across encoders and conditions L-BFGS.

    Returns:
      `{"train_top1", "test_top1", "train_loss", "iterations"}` as floats.
    """
    train_x = jnp.asarray(train_x, jnp.float32)
    test_x = jnp.asarray(test_x, jnp.float32)
    train_y = np.asarray(train_y).astype(np.int32)
    test_y = np.asarray(test_y).astype(np.int32)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"linear_probe wants [N, D] features with the same D, got "
                         f"{train_x.shape} and {test_x.shape}")
    if train_x.shape[0] != train_y.shape[0] or test_x.shape[0] != test_y.shape[0]:
        raise ValueError("linear_probe: features and labels disagree in length")
    max_label = int(max(train_y.max(), test_y.max()))
    if num_classes is None:
        num_classes = max_label + 1
    if max_label >= num_classes or min(train_y.min(), test_y.min()) < 0:
        raise Ov3Error(f"linear_probe: labels span [{min(train_y.min(), test_y.min())}, "
                       f"{max_label}] but num_classes={num_classes}; set the probe's "
                       "num_classes to the dataset's class count.")
    if standardize:
        train_x, test_x = _standardize(train_x, test_x)
    params, info = fit_logistic_regression(train_x, train_y, num_classes=num_classes,
                                           l2=l2, max_iters=max_iters, tol=tol)
    return {"train_top1": float(_top1(params, train_x, train_y)),
            "test_top1": float(_top1(params, test_x, test_y)),
            "train_loss": float(info["loss"]),
            "iterations": int(info["iterations"])}
