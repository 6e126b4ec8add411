"""gbml: gradient-based meta-learning (MAML, FO-MAML, Reptile, iMAML) with tested gradients.

The companion library of the gbml book. Parameters are plain ``dict[str, Tensor]``; an
algorithm computes each task's meta-update Δ_t, and :func:`meta_step` averages them over a batch
of tasks (with ``vmap`` or a loop) and hands the mean to any torch optimizer.
"""

from gbml.adapt import LossFn, proximal_task_adapt, task_adapt
from gbml.algorithms import FOMAML, IMAML, MAML, InnerAdamState, MetaAlgorithm, Reptile
from gbml.cg import CGResult, conjugate_gradient, hessian_vector_product
from gbml.errors import ConvergenceError, CorruptDataError, DivergenceError, MissingDataError
from gbml.meta import MetaStepResult, carried_meta_gradient, choose_batched, meta_gradient, meta_step
from gbml.models import (
    CompositeBatchNorm2d,
    ConvNet,
    SinusoidMLP,
    UnfoldConv2d,
    finn_omniglot_net,
    make_loss,
    rajeswaran_omniglot_net,
)
from gbml.omniglot import OmniglotTasks, load_omniglot, load_omniglot_miniature
from gbml.params import Params, parameters_of
from gbml.tasks import LinearRegressionTasks, SinusoidTasks, Task, TaskFamily, stack_tasks

__version__ = "0.1.0"

__all__ = [
    "FOMAML",
    "IMAML",
    "MAML",
    "CGResult",
    "CompositeBatchNorm2d",
    "ConvNet",
    "ConvergenceError",
    "CorruptDataError",
    "DivergenceError",
    "InnerAdamState",
    "LinearRegressionTasks",
    "LossFn",
    "MetaAlgorithm",
    "MetaStepResult",
    "MissingDataError",
    "OmniglotTasks",
    "Params",
    "Reptile",
    "SinusoidMLP",
    "SinusoidTasks",
    "Task",
    "TaskFamily",
    "UnfoldConv2d",
    "carried_meta_gradient",
    "choose_batched",
    "conjugate_gradient",
    "finn_omniglot_net",
    "hessian_vector_product",
    "load_omniglot",
    "load_omniglot_miniature",
    "make_loss",
    "meta_gradient",
    "meta_step",
    "parameters_of",
    "proximal_task_adapt",
    "rajeswaran_omniglot_net",
    "stack_tasks",
    "task_adapt",
]
