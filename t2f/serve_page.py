"""The page of `t2f serve` (Gradio Blocks): the inputs, the faces, the attention figure, downloads.

    page = build_page(Studio(pipeline), examples=["the woman has blond hair ."], downloads=Path("/tmp/x"))
    page.launch(server_name="127.0.0.1", server_port=7860)

The page holds no model code: `Studio.draw` (t2f/serving.py) serves each request. One endpoint is
public, `/generate` (caption, faces, seed, truncation, CA noise) -> (faces with their read-back,
read-back text, attention figure of face 1, face choice, downloads, message); the attention of
another face is drawn from what that request kept in the session, so choosing a face is instant.
Requests queue and run one at a time (one pipeline, one device).
"""

import functools
import json
import re
import time
import traceback
from pathlib import Path

import gradio as gr

from t2f.attention import attention_figure
from t2f.serving import MAX_FACES, RequestError, TimeLimitExceeded

QUEUE_SIZE = 64  # requests waiting beyond this are refused with Gradio's "queue is full" message


def build_page(studio, examples: list[str], downloads: Path) -> gr.Blocks:
    with gr.Blocks(title="t2f: text to face", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"## t2f: text to face\n{_about(studio)}")
        with gr.Row():
            with gr.Column(scale=2):
                caption = gr.Textbox(label="Caption", lines=2, max_lines=6, elem_id="caption",
                                     placeholder="The woman has blond hair and is smiling.")
                if examples:
                    gr.Examples([[c] for c in examples], inputs=[caption], label="Captions from the test split",
                                cache_examples=False)
                with gr.Row():
                    faces = gr.Slider(1, MAX_FACES, value=4, step=1, label="Faces", elem_id="n")
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                with gr.Row():
                    psi = gr.Slider(0.0, 2.0, value=studio.default_psi, step=0.05, elem_id="truncation",
                                    label="Truncation ψ (0 average face, 1 none)")
                    noise = gr.Checkbox(True, label="CA noise (off: z = μ, one face per caption)", elem_id="ca-noise")
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                message = gr.Markdown(elem_id="message")
                files = gr.File(label="Downloads: grid and settings (the JSON's command draws them again)",
                                file_count="multiple", interactive=False, elem_id="downloads")
            with gr.Column(scale=3):
                gallery = gr.Gallery(label="Faces, with what the recaptioner reads back (click one for its attention)",
                                     columns=4, height=330, format="png", object_fit="contain", elem_id="faces",
                                     interactive=False)
                read_back = gr.Textbox(label="What the recaptioner reads back", lines=2, interactive=False,
                                       elem_id="read-back")
                chosen = gr.Dropdown(choices=[1], value=1, label="Where the recaptioner looked for each word it read "
                                     "from face", elem_id="face", interactive=True)
                figure = gr.Image(show_label=False, type="pil", format="png", interactive=False, elem_id="attention")
        kept = gr.State(None)

        generate = functools.partial(_generate, studio, downloads)  # API parameters: caption, faces, seed, ...
        go.click(generate, [caption, faces, seed, psi, noise], [gallery, read_back, figure, chosen, files, message, kept],
                 api_name="generate", concurrency_id="pipeline")
        caption.submit(generate, [caption, faces, seed, psi, noise], [gallery, read_back, figure, chosen, files, message,
                       kept], api_visibility="private", concurrency_id="pipeline")
        gallery.select(_selected, [kept], [chosen], api_visibility="private", queue=False)
        chosen.change(_attention_of, [chosen, kept], [figure], api_visibility="private", queue=False)
    page.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return page


def _generate(studio, downloads: Path, caption, faces, seed, truncation, ca_noise):
    """One request -> the page's outputs; bad input or a timeout -> a message and nothing stale."""
    started = time.monotonic()
    try:
        result = studio.draw(caption, faces, seed, truncation, ca_noise)
    except RequestError as err:
        return _nothing(f"**Cannot generate:** {_escape(str(err))}")
    except TimeLimitExceeded as err:
        return _nothing(f"**Cancelled:** {_escape(str(err))}")
    except Exception:  # the server stays up; its console keeps the traceback
        traceback.print_exc()
        return _nothing("**Failed:** an internal error (the server's console has the details); the server is still up")
    folder = downloads / f"{time.time_ns()}"
    folder.mkdir(parents=True)
    stem = f"t2f-seed{result.settings['seed']}-n{result.settings['n']}"
    grid, settings = folder / f"{stem}-grid.png", folder / f"{stem}-settings.json"
    result.grid.save(grid)
    settings.write_text(json.dumps(result.settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    texts = [r.text for r in result.readings]
    kept = {"faces": result.faces, "readings": [(r.words, r.attention.numpy(), r.text) for r in result.readings]}
    notes = "".join(f"\n\n_Note: {_escape(note)}._" for note in result.notes)
    summary = (f"{len(texts)} face{'s' * (len(texts) > 1)} in {time.monotonic() - started:.1f} s · seed "
               f"{result.settings['seed']} · ψ {result.settings['truncation_psi']:g} · CA noise "
               f"{'on' if result.settings['ca_noise'] else 'off'}{notes}")
    return ([(face, text or "(nothing)") for face, text in zip(result.faces, texts)],
            "\n".join(f"{i}. {text}" for i, text in enumerate(texts, 1)),
            _figure(kept, 0), gr.Dropdown(choices=list(range(1, len(texts) + 1)), value=1),
            [str(grid), str(settings)], summary, kept)


def _nothing(message: str):
    return [], "", None, gr.Dropdown(choices=[1], value=1), None, message, None


def _selected(kept, event: gr.SelectData):
    return gr.Dropdown(value=event.index + 1) if kept else gr.Dropdown()


def _attention_of(face, kept):
    if not kept or not isinstance(face, int) or not 1 <= face <= len(kept["faces"]):
        return None
    return _figure(kept, face - 1)


def _figure(kept, index: int):
    words, attention, text = kept["readings"][index]
    return attention_figure(kept["faces"][index], words, attention, title=f"face {index + 1} reads: {text or '(nothing)'}")


def _about(studio) -> str:
    step = studio.step
    return (f"Checkpoint `{studio.pipeline.checkpoint}`" + (f", step {step}" if step is not None else "")
            + f" · {'EMA' if studio.use_ema else 'trained'} weights · {studio.device} · "
            f"{studio.pipeline.resolution}² faces · a request may run {studio.time_limit:g} s")


def _escape(text: str) -> str:
    """Text shown as written inside a Markdown paragraph (a caption may hold *, _, <, [ ...)."""
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", text)
