"""The conversation format: turns of text and audio parts, rendered with the LLM's own chat template.

Audio never becomes vocabulary tokens. A conversation renders to a list of segments; text segments are
tokenized by the LLM's tokenizer, audio segments become embedding rows from the audio encoder. Training
(labels), export (manifest) and runtime (decoding) all use `PromptFormat.render`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

ROLES = ("system", "user", "assistant")
TRANSCRIBE_INSTRUCTION = "Transcribe the audio."


@dataclass(frozen=True)
class Turn:
    """One message. parts: text (str) and audio (anything else: a path, samples, an index...)."""

    role: str
    parts: tuple = ()

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"turn role must be one of {ROLES}, got {self.role!r}")
        if isinstance(self.parts, (str, bytes)) or not isinstance(self.parts, (tuple, list)):
            object.__setattr__(self, "parts", (self.parts,))
        else:
            object.__setattr__(self, "parts", tuple(self.parts))
        if self.role != "user" and any(not isinstance(p, str) for p in self.parts):
            raise ValueError(f"only user turns can hold audio, got audio in a {self.role} turn")


@dataclass(frozen=True)
class Segment:
    """A piece of the rendered prompt: text to tokenize or audio to encode; labelled = trained on."""

    text: str | None = None
    audio: Any = None
    labelled: bool = False

    @property
    def is_audio(self) -> bool:
        return self.text is None


# Sentinels used to read a chat template's pieces; they must survive any template unchanged.
_S, _U, _A, _U2 = "\x01SYSTEM\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01USER2\x01"


@dataclass(frozen=True)
class PromptFormat:
    """Role templates read from the LLM's chat template. `{content}` marks where a message goes.

    bos: text before the conversation that the tokenizer itself does not add (e.g. "<bos>").
    system: template for a system turn; "" when the template has no system role, in which case the
        system text goes in front of the first user message, followed by system_joiner.
    """

    user: str
    assistant: str
    system: str = ""
    bos: str = ""
    system_joiner: str = "\n\n"
    default_system: str = ""
    audio_joiner: str = "\n"  # between an audio part and a text part in one message

    def __post_init__(self):
        for name in ("user", "assistant") + (("system",) if self.system else ()):
            if getattr(self, name).count("{content}") != 1:
                raise ValueError(f"{name} template must contain '{{content}}' once, got {getattr(self, name)!r}")

    @staticmethod
    def _split(template: str) -> tuple[str, str]:
        head, tail = template.split("{content}")
        return head, tail

    @property
    def generation_prompt(self) -> str:
        return self._split(self.assistant)[0]

    @property
    def end_of_turn(self) -> str:
        """What follows an assistant message; its stripped form is a stop string."""
        return self._split(self.assistant)[1]

    @property
    def stop(self) -> list[str]:
        s = self.end_of_turn.strip()
        return [s] if s else []

    def render(self, turns: Sequence[Turn], add_generation_prompt: bool = True,
               system: str | None = None, start: bool = True) -> list[Segment]:
        """Segments for turns. start=False renders a continuation (no bos, no default system)."""
        turns = list(turns)
        if start:
            if system is None:
                system = self.default_system
            if system and not (turns and turns[0].role == "system"):
                turns.insert(0, Turn("system", (system,)))
        out: list[Segment] = []
        if start and self.bos:
            out.append(Segment(text=self.bos))
        pending_system = ""
        for turn in turns:
            if turn.role == "system":
                if self.system:
                    head, tail = self._split(self.system)
                    out.append(Segment(text=head + "".join(turn.parts) + tail))
                else:
                    pending_system = "".join(turn.parts)
                continue
            head, tail = self._split(self.user if turn.role == "user" else self.assistant)
            parts = list(turn.parts)
            if pending_system:
                parts.insert(0, pending_system + self.system_joiner)
                pending_system = ""
            if turn.role == "assistant":
                out.append(Segment(text=head))
                out.append(Segment(text="".join(parts) + tail, labelled=True))
                continue
            pieces: list[Segment] = []
            text = head
            for i, part in enumerate(parts):
                if isinstance(part, str):
                    if i > 0 and not isinstance(parts[i - 1], str):
                        text += self.audio_joiner
                    text += part
                else:
                    if i > 0 and isinstance(parts[i - 1], str) and not parts[i - 1].endswith(self.system_joiner):
                        text += self.audio_joiner
                    pieces.append(Segment(text=text))
                    pieces.append(Segment(audio=part))
                    text = ""
            text += tail
            pieces.append(Segment(text=text))
            out.extend(p for p in pieces if p.is_audio or p.text)
        if add_generation_prompt:
            out.append(Segment(text=self.generation_prompt))
        return _merge_text(out)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PromptFormat":
        return cls(**d)

    @classmethod
    def from_chat_template(cls, render: Callable[[list[dict], bool], str], bos: str = "",
                           default_system: str = "") -> "PromptFormat":
        """Read role templates from a chat template. render(messages, add_generation_prompt) -> str.

        bos: the tokenizer's own bos text; when the template writes it, it is kept in `bos` so the
        prompt is rendered exactly as the template would.
        """
        def msgs(*pairs):
            return [{"role": r, "content": c} for r, c in pairs]

        one = render(msgs(("user", _U)), False)
        two = render(msgs(("user", _U), ("assistant", _A)), False)
        three = render(msgs(("user", _U), ("assistant", _A), ("user", _U2)), True)
        gen = render(msgs(("user", _U)), True)
        for name, text, marks in (("one", one, [_U]), ("two", two, [_U, _A]), ("three", three, [_U, _A, _U2])):
            if any(text.count(m) != 1 for m in marks):
                raise ValueError(f"chat template does not render messages verbatim (case {name}): {text!r}")
        user_tail = one.split(_U)[1]
        if not gen.startswith(one):
            raise ValueError(f"chat template's generation prompt does not extend the rendered turn: {gen!r}")
        gen_prompt = gen[len(one):]
        after_a = two.split(_A)[1]  # end of assistant turn
        between = three.split(_A)[1].split(_U2)[0]  # end of assistant turn + next user head
        if not between.startswith(after_a):
            raise ValueError(f"chat template renders an assistant turn differently mid-conversation: {between!r}")
        user_head = between[len(after_a):]
        prefix = one.split(_U)[0]  # bos + default system block + user head
        if not prefix.endswith(user_head):
            raise ValueError(f"chat template renders the first user turn differently: {prefix!r}")
        lead = prefix[: len(prefix) - len(user_head)]
        # The first assistant head: between the first user tail and _A.
        assistant_head = two.split(_U)[1].split(_A)[0][len(user_tail):]
        if assistant_head != gen_prompt:
            raise ValueError(f"generation prompt {gen_prompt!r} differs from assistant head {assistant_head!r}")
        template_bos = bos if bos and lead.startswith(bos) else ""
        system_tmpl, joiner = "", "\n\n"
        try:
            with_sys = render(msgs(("system", _S), ("user", _U)), False)
        except Exception:  # templates that raise on a system role
            with_sys = ""
        if with_sys.count(_S) == 1:
            before_user = with_sys.split(_U)[0]
            if before_user.endswith(user_head) and _S in before_user[: len(before_user) - len(user_head)]:
                block = before_user[len(template_bos): len(before_user) - len(user_head)]
                system_tmpl = block.replace(_S, "{content}")
            elif before_user.startswith(template_bos + user_head):
                joiner = before_user.split(_S)[1]  # system folded into the first user message
        elif not lead[len(template_bos):] == "":
            pass
        # A template that inserts its own system block when none is given (Qwen) shows it in `lead`.
        implied = lead[len(template_bos):]
        if implied and system_tmpl and not default_system:
            h, t = system_tmpl.split("{content}")
            if implied.startswith(h) and implied.endswith(t):
                default_system = implied[len(h): len(implied) - len(t)]
        return cls(user=user_head + "{content}" + user_tail, assistant=gen_prompt + "{content}" + after_a,
                   system=system_tmpl, bos=template_bos, system_joiner=joiner, default_system=default_system)


def jinja_renderer(template: str, bos_token: str = "", eos_token: str = "") -> Callable[[list[dict], bool], str]:
    """render(messages, add_generation_prompt) for a Jinja chat template (as a GGUF stores it), rendered the way
    transformers renders it (sandboxed, trim_blocks, lstrip_blocks); for PromptFormat.from_chat_template."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover - jinja2 comes with llama-cpp-python
        raise ValueError("reading a chat template needs jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                               bos_token=bos_token, eos_token=eos_token)

    return render


def _merge_text(segments: list[Segment]) -> list[Segment]:
    """Join neighbouring text segments of the same labelling."""
    out: list[Segment] = []
    for s in segments:
        if out and not s.is_audio and not out[-1].is_audio and out[-1].labelled == s.labelled:
            out[-1] = Segment(text=out[-1].text + s.text, labelled=s.labelled)
        elif s.is_audio or s.text:
            out.append(s)
    return out


def transcribe_turns(audio: Any, instruction: str = TRANSCRIBE_INSTRUCTION) -> list[Turn]:
    """The fixed ASR prompt of stage-1 training and of `transcribe`: instruction, then the audio."""
    return [Turn("user", (instruction, audio))]
