"""llasm-serve: the OpenAI API over one loaded bundle, for desktop apps and scripts on this machine.

    api.py     the OpenAI shapes: requests read into conversations of llasm Turns, replies written as completion
               objects and stream chunks, errors as error objects (no web framework)
    engine.py  one model, many clients: one queue, one llama.cpp context, cancellation
    app.py     the routes (Starlette, served by uvicorn): body limits, the API key, server-sent events

It uses the runtime's public API and nothing in the runtime imports it; the web framework is the `serve` extra
(pip install 'llasm[serve]').
"""
