"""The minimal page really serves the pipeline over Gradio's API (gradio_client, 127.0.0.1 only)."""

from __future__ import annotations

import pytest


@pytest.fixture()
def app_url():
    from app import demo

    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                            quiet=True, show_error=True)
    try:
        yield url
    finally:
        demo.close()


def test_quantize_endpoint(app_url, tiny_bpe):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    card, report = client.predict(str(tiny_bpe), ["Q8_0"], "", False, False, api_name="/quantize")
    assert report["files"][0]["variant"] == "Q8_0"
    assert report["files"][0]["filename"] == "tiny-llama-bpe-Q8_0.gguf"
    assert "tiny-llama-bpe-Q8_0.gguf" in card


def test_quantize_endpoint_reports_readable_errors(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="No model given"):
        client.predict("", ["Q8_0"], "", False, False, api_name="/quantize")
