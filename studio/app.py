"""build(ctx) -> gr.Blocks: a header (project, models, device), the job list, and the four tabs in workflow order;
serve(...) runs it on this machine behind a Host header check."""

from __future__ import annotations

import html
import socket
from functools import partial
from pathlib import Path

import gradio as gr

from studio import jobs_panel
from studio.context import AppContext
from studio.progress import answer_people_errors
from tabs import captions, clips, generate, train

TABS = (clips, captions, train, generate)  # the workflow's order: cut, caption, train, try


def header_html(ctx: AppContext) -> str:
    items = {
        "Project": f"{ctx.project.name} ({ctx.project.root})",
        "Wan model": ctx.wan_model(),
        "Captioner": ctx.models.captioner,
        "Video captioner": ctx.models.video_captioner,
        "Device": ctx.device_description,
    }
    cells = "".join(
        f'<span class="studio-header-item"><b>{html.escape(k)}:</b> <code>{html.escape(v)}</code></span>'
        for k, v in items.items()
    )
    return f'<div id="studio-header"><h2>Wan LoRA Studio</h2>{cells}</div>'


def build(ctx: AppContext) -> gr.Blocks:
    with gr.Blocks(title="Wan LoRA Studio") as app:
        header = gr.HTML(header_html(ctx))
        changes = jobs_panel.build(ctx)
        tab_items = {}
        with gr.Tabs() as tabs:
            for tab in TABS:
                with gr.Tab(tab.TITLE, id=tab.TITLE.lower()) as tab_items[tab.TITLE]:
                    tab.build(ctx)
        ctx.ui["tabs"] = tabs
        # Cross-tab wiring (e.g. Train's "open in Generate") runs once every tab's components exist.
        for tab in TABS:
            if hasattr(tab, "connect"):
                tab.connect(ctx)
        # Every tab shows the disk as it is now: re-read on selecting the tab and whenever a job changed it.
        for title, (refresh, inputs, outputs) in ctx.refreshers.items():
            tab_items[title].select(refresh, inputs, outputs, show_progress="hidden")
            changes.change(refresh, inputs, outputs, show_progress="hidden")
        # The header names the project's model as project.json has it now (the Train tab can switch it).
        app.load(partial(header_html, ctx), None, header, show_progress="hidden")
        tabs.change(partial(header_html, ctx), None, header, show_progress="hidden")
        # A person's mistake in any handler is answered in a toast, never with error badges over the outputs.
        for event in app.fns.values():
            if event.fn is not None and not event.types_generator:
                event.fn = answer_people_errors(event.fn, len(event.outputs))
    return app


LOCAL_HOSTS = ("127.0.0.1", "localhost")
ALL_INTERFACES = ("0.0.0.0", "::", "")


def allowed_hosts(bind: str, extra: list[str], share: bool = False) -> list[str]:
    """The host names a request may carry: this machine's loopback names, the bound address, and `extra`. Any other
    Host header is refused, so a web page that points its own domain at 127.0.0.1 (DNS rebinding) cannot call the
    studio from the user's browser. Bound to every interface, the machine's own names count too."""
    hosts = [*LOCAL_HOSTS, *extra]
    if bind in ALL_INTERFACES:
        hosts += [socket.gethostname(), socket.getfqdn()]
    else:
        hosts.append(bind)
    if share:
        hosts.append("*.gradio.live")  # Gradio's share links arrive through its tunnel under this domain
    return list(dict.fromkeys(hosts))


def host_check(hosts: list[str]):
    """Starlette's TrustedHostMiddleware (a 400 answer to any other Host header) as a FastAPI middleware entry."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    return Middleware(TrustedHostMiddleware, allowed_hosts=hosts)


def serve(app: gr.Blocks, host: str, port: int, hosts: list[str], *, allowed_paths: list[str],
          css_paths: list[Path]) -> None:
    """Serve the studio until interrupted: the Blocks mounted on a FastAPI app with the Host check, run by uvicorn.

    Not Blocks.launch: its start-up checks give up after a few seconds (a 5 s wait for the server thread, 3 s
    requests to itself), so a launch on a busy machine (load average 13) aborted. uvicorn here waits as long as
    start-up takes. Raises OSError naming the address when it cannot be bound (e.g. the port is in use).
    """
    import uvicorn
    from fastapi import FastAPI

    server = FastAPI(middleware=[host_check(hosts)])
    server = gr.mount_gradio_app(server, app, path="/", server_name=host, server_port=port,
                                 allowed_paths=allowed_paths, show_error=True, css_paths=css_paths)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host or "0.0.0.0", port))
    except OSError as err:
        sock.close()
        raise OSError(f"Cannot serve on {host}:{port} ({err.strerror}): another program uses that port; choose "
                      "another with --port.") from err
    print(f"Wan LoRA Studio on http://{'127.0.0.1' if host in ALL_INTERFACES else host}:{port}/", flush=True)
    uvicorn.Server(uvicorn.Config(server, log_level="warning")).run(sockets=[sock])
