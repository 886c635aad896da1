"""`serve` loads and warms the models on the server's one model thread, the thread every conversation's turns
run on: no MLX/ONNX call on the main thread (the event loop's)."""

from __future__ import annotations

import threading

from agent.config import load_config


def test_serve_loads_and_warms_the_models_on_the_model_thread(monkeypatch):
    import agent.build
    import agent.engine
    import agent.web.server as server_module

    seen: dict[str, threading.Thread] = {}

    def build_stages(cfg, log=print):
        seen["build"] = threading.current_thread()
        return "stages"

    class Engine:
        def __init__(self, stages, log=print):
            assert stages == "stages"

        def warmup(self):
            seen["warmup"] = threading.current_thread()

    servers = []

    class Server(server_module.Server):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(agent.build, "build_stages", build_stages)
    monkeypatch.setattr(agent.engine, "TurnEngine", Engine)
    monkeypatch.setattr(server_module, "Server", Server)
    monkeypatch.setattr(server_module.asyncio, "run", lambda main: main.close())  # no listening
    server_module.serve(load_config("default"), port=0, log=lambda m: None)

    (server,) = servers
    assert server.stages == "stages"
    model_thread = server.owner.submit(threading.current_thread).result()
    assert seen["build"] is seen["warmup"] is model_thread is not threading.main_thread()
    server.owner.shutdown()
