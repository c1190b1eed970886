"""Dispatchers: move kept (token, expert) pairs to the experts' ranks and back.

``base.py`` holds the interface (:class:`Dispatcher`: ``dispatch`` / ``combine`` /
``run``) and the frozen :class:`DispatchMetadata`; ``steps.py`` the steps the siblings
share (count exchange, split sizes, regroup, row exchange); one module per sibling; and
``factory.make_dispatcher``, the only module that imports them all.
"""

from .base import Dispatcher, DispatchMetadata, NonFiniteRouterError
from .factory import make_dispatcher

__all__ = ["Dispatcher", "DispatchMetadata", "NonFiniteRouterError", "make_dispatcher"]
