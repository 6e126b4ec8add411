"""The four algorithms, one module each, paired with the book's chapters."""

from gbml.algorithms.base import MetaAlgorithm, TaskInfo
from gbml.algorithms.fomaml import FOMAML
from gbml.algorithms.imaml import IMAML
from gbml.algorithms.maml import MAML
from gbml.algorithms.reptile import InnerAdamState, Reptile

__all__ = ["FOMAML", "IMAML", "MAML", "InnerAdamState", "MetaAlgorithm", "Reptile", "TaskInfo"]
