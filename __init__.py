"""llasm: a Large Language and Speech Model that trains on a GPU and runs offline on a laptop.

    from llasm import LLaSM
    model = LLaSM.load("path/to/bundle")
    print(model.chat().send(audio="question.wav").text)
"""
__version__ = "0.1.0"

__all__ = ["LLaSM", "__version__"]


def __getattr__(name):  # lazy: importing llasm must not load onnxruntime or llama.cpp
    if name == "LLaSM":
        from .runtime.chat import LLaSM

        return LLaSM
    raise AttributeError(f"module 'llasm' has no attribute {name!r}")
