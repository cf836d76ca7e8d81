"""The serving stage: a trained run as an HTTP service (``medseg serve``) and a page people drop frames into.

It reads frames and predicts them with the inference stage's code, so that a frame posted to the server gets the
masks and RLE ``medseg predict`` gives the same file. FastAPI and uvicorn come with the ``medseg[serve]`` extra.
"""
