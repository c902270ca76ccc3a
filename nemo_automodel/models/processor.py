"""Processor loading for vision-language models (image processor + tokenizer + chat template).

Processors that declare a video processor (Qwen2-VL, Qwen2.5-VL, SmolVLM) cannot be built
without torchvision. Then the same processor class is built without one: images and text work,
videos do not. The fallback lives in this function, so every process (torchrun workers too)
gets it without any registration.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from nemo_automodel.errors import ConfigError, first_line
from nemo_automodel.models.tokenizer import ensure_pad_token

if TYPE_CHECKING:
    from transformers import ProcessorMixin

VIDEO = "video_processor"


def load_processor(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> ProcessorMixin:
    """``AutoProcessor.from_pretrained`` with a pad token, and without a video processor when
    torchvision is missing. Failures are a one-line ConfigError naming ``name_or_path``."""
    from transformers import AutoProcessor, ProcessorMixin

    path = Path(name_or_path).expanduser()
    if (path.is_absolute() or name_or_path.startswith((".", "~"))) and not path.is_dir():
        raise ConfigError(f"processor {name_or_path!r} could not be loaded: no such folder")
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # transformers raises OSError, ValueError, AttributeError, ImportError, ...
        cls = _video_processor_class(name_or_path, trust_remote_code, revision)
        if cls is None:
            raise ConfigError(f"processor {name_or_path!r} could not be loaded: {_cause(err)}") from err
        try:
            processor = _load_without_video(cls, name_or_path, trust_remote_code, revision)
        except Exception as err2:
            raise ConfigError(f"processor {name_or_path!r} could not be loaded without its video processor "
                              f"(torchvision is not installed): {_cause(err2)}") from err2
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "tokenizer", None) is None:
        raise ConfigError(f"processor {name_or_path!r} could not be loaded: the folder has no processor config "
                          f"(found only a {type(processor).__name__}); a vision-language model needs one")
    ensure_pad_token(processor.tokenizer)
    return processor


def has_chat_template(processor: Any) -> bool:
    """Whether the processor (or its tokenizer) has a chat template."""
    tokenizer = getattr(processor, "tokenizer", None)
    return bool(getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None))


def _cause(err: BaseException) -> str:
    """The first line of a transformers error, without its boilerplate about Hub ids."""
    return first_line(err).split(" If you were trying to load it from")[0]


def _video_processor_class(name_or_path: str, trust_remote_code: bool,
                           revision: str | None) -> type[ProcessorMixin] | None:
    """The library processor class of the model when it declares a video processor and torchvision
    is missing (the case the fallback covers); None otherwise."""
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return None
    cls: type[ProcessorMixin] | None
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
        # a processor class: transformers types the lazy mapping's values as the tokenizer mapping's pairs
        cls = cast("type[ProcessorMixin]", PROCESSOR_MAPPING[type(config)])
    except Exception:  # no model config (a saved adapter folder): the library class the processor saved
        cls = _saved_processor_class(name_or_path, revision)
    return cls if cls is not None and VIDEO in cls.get_attributes() else None


def _saved_processor_class(name_or_path: str, revision: str | None) -> type[ProcessorMixin] | None:
    """The transformers class named by ``processor_class`` in the folder's processor config, or None."""
    import transformers
    from transformers import ProcessorMixin

    try:
        saved, _ = ProcessorMixin.get_processor_dict(name_or_path, revision=revision)
    except Exception:  # no processor config, remote code: no fallback
        return None
    cls = getattr(transformers, str(saved.get("processor_class")), None)
    return cls if isinstance(cls, type) and issubclass(cls, ProcessorMixin) else None


def _load_without_video(cls: type[ProcessorMixin], name_or_path: str, trust_remote_code: bool,
                        revision: str | None) -> ProcessorMixin:
    """``cls`` from the folder with its image processor, tokenizer, chat template and saved init
    arguments, and no video processor."""
    from transformers import AutoImageProcessor, AutoTokenizer

    kwargs = dict(trust_remote_code=trust_remote_code, revision=revision)
    saved, _ = cls.get_processor_dict(name_or_path, revision=revision)
    accepted = set(inspect.signature(cls.__init__).parameters) - set(cls.get_attributes())
    # a class is hashable: typeshed checks ProcessorMixin's instance __hash__ against Hashable here
    no_video = without_video(cls)  # type: ignore[arg-type]
    return no_video(image_processor=AutoImageProcessor.from_pretrained(name_or_path, **kwargs),
                    tokenizer=AutoTokenizer.from_pretrained(name_or_path, **kwargs),
                    **{k: v for k, v in saved.items() if k in accepted})


@functools.cache
def without_video(cls: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``cls`` built with no video processor: its ``__init__`` takes every sub-processor but the
    video one (``get_attributes`` reads that signature), and ``video_processor=None`` is dropped on
    its way to ``ProcessorMixin.__init__``. Saved, it still says ``processor_class: cls.__name__``.
    Build it with keyword arguments (``from_pretrained`` on it would drop the chat template)."""
    from transformers import ProcessorMixin

    names = cls.get_attributes()
    video_at = names.index(VIDEO)
    signature = inspect.signature(cls.__init__)

    class _DropVideo(ProcessorMixin):
        def __init__(self, *args, **kwargs):
            kwargs.pop(VIDEO, None)
            if len(args) > video_at:  # sub-processors come positionally, in attribute order
                args = args[:video_at] + args[video_at + 1:]
            super().__init__(*args, **kwargs)

    def __init__(self, *args, **kwargs):
        kwargs.update(zip([n for n in names if n != VIDEO], args))
        cls.__init__(self, **{VIDEO: None}, **kwargs)

    # typeshed's function type has no __signature__; inspect.signature reads it
    __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for n, p in signature.parameters.items() if n != VIDEO])
    # SmolVLM's apply_chat_template reads num_frames/fps from its video processor.
    return type(cls.__name__, (cls, _DropVideo), {"__init__": __init__, "__module__": __name__,
                                                  "__qualname__": cls.__name__,
                                                  "video_processor": _NoVideoProcessor()})


class _NoVideoProcessor:
    """Stands in for the missing video processor where a processor reads its defaults."""

    num_frames = None
    fps = None

    def __bool__(self) -> bool:
        return False
