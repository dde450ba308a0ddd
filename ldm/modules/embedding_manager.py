"""Textual inversion's learned words.

The EmbeddingManager owns one small matrix of vectors per placeholder string (such as "*") and, called by the
text encoder right after its token-embedding lookup, swaps the placeholder's embedding for those vectors.
Only these vectors are trained; the text encoder and the diffusion model stay frozen.

Loaded concepts may also be named by any string, such as an AUTOMATIC1111 file name ("EasyNegative"): its token
sequence in the prompt is replaced by its vectors, longest name first, as the webui does.
"""
import os
import warnings

import torch
from torch import nn

from ldm.data.personalized import per_image_token_strings
from ldm.modules.embedding_io import ENCODER_KEYS, load_embedding_file, save_embedding_file, single_token_id
from ldm.modules.encoders.base import context_length, embedding_key

DEFAULT_PLACEHOLDER_TOKEN = ["*"]

# With progressive_words, one more vector of each placeholder becomes active every PROGRESSIVE_SCALE steps (the
# original's value, tuned for its 5000-step runs; `progressive_steps` sets another).
PROGRESSIVE_SCALE = 2000


class EmbeddingManager(nn.Module):
    """Learned embedding vectors for placeholder strings (implements ldm.modules.encoders.base's
    EmbeddingManagerProtocol).

    embedder: a text encoder of ldm.modules.encoders.modules (FrozenCLIPEmbedder or BERTEmbedder).
    placeholder_strings: strings that must each be exactly one token for the embedder's tokenizer.
    initializer_words: the i-th placeholder starts from the token embedding(s) of the i-th word. A word of k tokens
        needs num_vectors_per_token >= k: vector j < k starts from the j-th token, the remaining vectors from
        the mean of the k token embeddings. Without a word the vectors start uniform in [0, 1) like the original.
    per_image_tokens: also add per-image placeholders: true for the original's (ldm.data.personalized.
        per_img_token_list), or a list of strings (ldm.data.personalized.per_image_token_strings).
    progressive_words: activate the vectors one at a time, one more every `progressive_steps` optimizer steps
        (default PROGRESSIVE_SCALE), counted by `progressive_step`, which the training loop sets to the global step.
    """

    per_layer = False

    def __init__(self, embedder, placeholder_strings=None, initializer_words=None, per_image_tokens=False,
                 num_vectors_per_token=1, progressive_words=False, progressive_steps=PROGRESSIVE_SCALE):
        super().__init__()
        if int(progressive_steps) < 1:
            raise ValueError(f"progressive_steps must be a positive number of steps, got {progressive_steps!r}.")
        # A bound method, not a submodule: the embedder's weights belong to the text encoder, not to us.
        self._token_ids_of = embedder.string_to_token_ids
        self.token_dim = embedder.embedding_dim
        self.max_length = context_length(embedder)
        self.string_to_token_dict = {}  # one-token concepts: string -> tensor(id), as in the original
        self.string_to_token_sequence = {}  # concepts of several tokens: string -> tuple of ids
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()  # fixed targets of the regulariser, never optimized
        self.progressive_words = progressive_words
        self.progressive_steps = int(progressive_steps)
        self.progressive_step = None
        self.register_buffer("_placeholder_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("_vector_counts", torch.zeros(0, dtype=torch.long), persistent=False)

        placeholder_strings = list(placeholder_strings or DEFAULT_PLACEHOLDER_TOKEN)
        num_given = len(placeholder_strings)
        placeholder_strings += per_image_token_strings(per_image_tokens)
        initializer_words = list(initializer_words or [])
        for idx, string in enumerate(placeholder_strings):
            origin = "placeholder string" if idx < num_given else "per-image token (per_image_tokens=True)"
            token = self._single_token(string, origin)
            word = initializer_words[idx] if idx < len(initializer_words) else None
            if word:
                vectors = self._initial_vectors(embedder.token_embedding, word, num_vectors_per_token)
                self.initial_embeddings[string] = nn.Parameter(vectors.clone(), requires_grad=False)
            else:
                vectors = torch.rand(num_vectors_per_token, self.token_dim)
            self._set_placeholder(string, token, vectors)

    # ------------------------------------------------------------------ construction
    def _single_token(self, string, origin="placeholder string"):
        token = single_token_id(self._token_ids_of, string)
        if token is None:
            raise ValueError(
                f"The {origin} {string!r} is {len(self._token_ids_of(string))} tokens for this text encoder's "
                "tokenizer, but a trained placeholder must be exactly one token. Choose another string (for CLIP, "
                "'*' or a rare word such as 'sks').")
        return token

    def _initial_vectors(self, token_embedding, word, num_vectors):
        ids = self._token_ids_of(word)
        if not ids:
            raise ValueError(f"The initializer word {word!r} is empty for this text encoder's tokenizer.")
        if len(ids) > num_vectors:
            raise ValueError(
                f"The initializer word {word!r} is {len(ids)} tokens but num_vectors_per_token is {num_vectors}: "
                f"raise num_vectors_per_token to {len(ids)} or choose a one-token initializer word.")
        with torch.no_grad():
            embeddings = token_embedding(torch.tensor(ids, device=token_embedding.weight.device)).float().cpu()
        fill = embeddings.mean(dim=0, keepdim=True).expand(num_vectors - len(ids), -1)
        return torch.cat([embeddings, fill])

    def _token_sequences(self):
        sequences = {s: (int(t),) for s, t in self.string_to_token_dict.items()}
        return {**sequences, **self.string_to_token_sequence}

    def _set_placeholder(self, string, token_ids, vectors):
        """Add or replace the vectors of `string`, written as the token ids `token_ids` (an int or a sequence)."""
        ids = (token_ids,) if isinstance(token_ids, int) else tuple(token_ids)
        room = self.max_length - 2  # a prompt's positions between the start and end tokens
        if vectors.shape[-2] > room:
            raise ValueError(f"Placeholder {string!r} has {vectors.shape[-2]} vectors, but a prompt holds at most "
                             f"{room} (the text encoder reads {self.max_length} positions with its start and end "
                             "tokens): it can never fit.")
        clash = [s for s, seq in self._token_sequences().items() if s != string and seq == ids]
        if clash:
            raise ValueError(f"Placeholder {string!r} is the same token(s) as placeholder {clash[0]!r} for this "
                             "text encoder's tokenizer, so a prompt could not tell them apart; use another string.")
        device = self._placeholder_ids.device
        self.string_to_token_dict.pop(string, None)
        self.string_to_token_sequence.pop(string, None)
        if len(ids) == 1:
            self.string_to_token_dict[string] = torch.tensor(ids[0])
        else:
            self.string_to_token_sequence[string] = ids
        self.string_to_param_dict[string] = nn.Parameter(vectors.float().to(device), requires_grad=True)
        # The original's one-token path (forward) uses these; it runs only while every concept is one token.
        self._placeholder_ids = torch.tensor([int(t) for t in self.string_to_token_dict.values()], device=device)
        self._vector_counts = torch.tensor([p.shape[-2] for p in self.string_to_param_dict.values()], device=device)

    def names_lost_in(self, text):
        """Concepts written in `text` whose tokens are not in its tokenization, so the prompt will not use them.

        CLIP's BPE merges a placeholder with the punctuation after it ("*," is one token, 41895, not "*" and ","),
        exactly as in the original; the user sees `*` in the prompt but the model never sees the placeholder.
        """
        ids = tuple(self._token_ids_of(text))
        lost = []
        for string, seq in self._token_sequences().items():
            n = len(seq)
            if string in text and not any(ids[i:i + n] == seq for i in range(len(ids) - n + 1)):
                lost.append(string)
        return lost

    def prompt_positions(self, text):
        """How many positions `text` takes in the text encoder: start and end tokens, its tokens, and the extra
        positions of each placeholder's vectors beyond its tokens."""
        ids = tuple(self._token_ids_of(text))
        extra = 0
        for string, seq in self._token_sequences().items():
            n = len(seq)
            found = sum(ids[i:i + n] == seq for i in range(len(ids) - n + 1))
            extra += found * (self.string_to_param_dict[string].shape[-2] - n)
        return len(ids) + extra + 2

    @property
    def concepts(self):
        return list(self.string_to_param_dict)

    def manager_for(self, encoder):
        return self

    def interchange_format(self):
        """One concept: also the AUTOMATIC1111 layout ({"emb_params"}) the webui, kohya and diffusers read."""
        return "a1111-safetensors" if len(self.concepts) == 1 else None

    @property
    def max_vectors_per_token(self):
        return max((p.shape[-2] for p in self.string_to_param_dict.values()), default=1)

    def num_active_vectors(self):
        """How many vectors per placeholder are in use now (progressive_words limits it)."""
        if self.progressive_words and self.progressive_step is not None:
            return min(self.progressive_step // self.progressive_steps + 1, self.max_vectors_per_token)
        return self.max_vectors_per_token

    # ------------------------------------------------------------------ forward
    def encode_tokens(self, encoder, tokens):
        """The conditioning of token ids `tokens` with this manager's vectors spliced in (XTI overrides it)."""
        return encoder.encode_tokens(tokens, embedding_manager=self)

    def forward(self, tokenized_text, embedded_text):
        """Embeddings (b, n, d) of `tokenized_text` (b, n) with every placeholder replaced by its vectors.

        A placeholder with several vectors takes several positions: the following tokens shift right and the
        row is cut back to n. A row that overflows keeps its last token (end/pad), as the tokenizer's truncation
        does. Concepts named by several tokens take the general path, _replace_sequences.
        """
        if not self.string_to_param_dict:
            return embedded_text
        return self._rewrite(tokenized_text, embedded_text, dict(self.string_to_param_dict))

    def spliced_token_ids(self, tokenized_text):
        """The token id at each position of forward's output (b, n): a concept's first id once per vector it puts
        there. Where an encoder reads a position by token id (OpenCLIP's pooled output, at the end token), it must
        read these ids: with several vectors per placeholder the end token moves right."""
        if not self.string_to_param_dict:
            return tokenized_text
        sequences = self._token_sequences()
        ids = {s: torch.full((p.shape[-2], 1), float(sequences[s][0]), device=tokenized_text.device)
               for s, p in self.string_to_param_dict.items()}
        # float64 holds every token id exactly; the ids travel through the same code as the embeddings.
        as_embedding = tokenized_text.unsqueeze(-1).to(torch.float64)
        return self._rewrite(tokenized_text, as_embedding, ids).squeeze(-1).round().long()

    def _rewrite(self, tokenized_text, embedded_text, vectors):
        """forward with `vectors` ({string: [k, d]}, ordered as string_to_param_dict) standing for the vectors."""
        if self.string_to_token_sequence:
            return self._replace_sequences(tokenized_text, embedded_text, self.num_active_vectors(), vectors)
        # (b, n, P): which placeholder, if any, each token is; placeholder token ids are distinct.
        matches = tokenized_text.unsqueeze(-1) == self._placeholder_ids
        active = self.num_active_vectors()
        if active == 1:
            table = torch.stack([p[0] for p in vectors.values()]).to(embedded_text.dtype)
            which = matches.long().argmax(dim=-1)
            return torch.where(matches.any(dim=-1, keepdim=True), table[which], embedded_text)
        return self._splice(matches, embedded_text, active, list(vectors.values()))

    def _splice(self, matches, embedded_text, active, params):
        b, n, d = embedded_text.shape
        table = embedded_text.new_zeros(len(params), active, d)  # (P, active, d), padded with zeros
        for i, p in enumerate(params):
            table[i, :min(p.shape[0], active)] = p[:active].to(embedded_text.dtype)
        counts = self._vector_counts.clamp(max=active)

        is_placeholder = matches.any(dim=-1)
        which = matches.long().argmax(dim=-1)
        width = torch.where(is_placeholder, counts[which], torch.ones_like(which))  # output slots per input token
        ends = width.cumsum(dim=-1)
        out_pos = torch.arange(n, device=embedded_text.device).repeat(b, 1)
        src = torch.searchsorted(ends, out_pos, right=True)  # input token that fills each output position
        offset = out_pos - (ends - width).gather(1, src)  # index of the vector within that token's slots

        spliced = table[which.gather(1, src), offset]
        source = embedded_text.gather(1, src.unsqueeze(-1).expand(b, n, d))
        out = torch.where(is_placeholder.gather(1, src).unsqueeze(-1), spliced, source)
        overflow = (ends[:, -1] > n).view(b, 1)
        last = torch.where(overflow, embedded_text[:, -1], out[:, -1])
        return torch.cat([out[:, :-1], last.unsqueeze(1)], dim=1)

    def _replace_sequences(self, tokenized_text, embedded_text, active, vectors=None):
        """Every concept's token sequence replaced by its vectors, longest sequence first at each position.

        Rows stay n long: a row that grows keeps its first n - 1 positions and its last token (end/pad), like the
        one-token path, warning when more than padding is lost; a row that shrinks is padded with its last token.
        """
        vectors = self.string_to_param_dict if vectors is None else vectors
        b, n, d = embedded_text.shape
        by_first = {}
        for string, ids in sorted(self._token_sequences().items(), key=lambda item: -len(item[1])):
            by_first.setdefault(ids[0], []).append((ids, string))
        rows, longest = [], 0
        for row_ids, row in zip(tokenized_text.tolist(), embedded_text):
            pieces, start, i = [], 0, 0
            while i < n:
                match = next((m for m in by_first.get(row_ids[i], ()) if tuple(row_ids[i:i + len(m[0])]) == m[0]),
                             None)
                if match is None:
                    i += 1
                    continue
                ids, string = match
                pieces += [row[start:i], vectors[string][:active].to(row.dtype)]
                i = start = i + len(ids)
            pieces.append(row[start:])
            out = torch.cat(pieces)
            padding = next((k for k, token in enumerate(reversed(row_ids)) if token != row_ids[-1]), n) - 1
            longest = max(longest, out.shape[0] - padding)  # the prompt's own length: bos, text, vectors, eos
            if out.shape[0] > n:
                out = torch.cat([out[:n - 1], row[-1:]])
            rows.append(torch.cat([out, row[-1:].expand(n - out.shape[0], d)]))
        if longest > n:
            warnings.warn(f"A prompt with its embedding vectors is {longest} positions long; the text encoder takes "
                          f"{n}, so it was cut to {n} (the end token kept). Use fewer or shorter embeddings per "
                          "prompt.", stacklevel=2)
        return torch.stack(rows)

    # ------------------------------------------------------------------ training helpers
    def embedding_parameters(self):
        return self.string_to_param_dict.parameters()

    def embedding_to_coarse_loss(self):
        """Mean over initialised placeholders of the squared distance of the vectors from their initial values.

        Equals the original's (optimized - coarse) @ (optimized - coarse).T for one vector, and stays a scalar
        (summing over vectors) when there are several.
        """
        loss = torch.zeros((), device=self._placeholder_ids.device)
        for key, coarse in self.initial_embeddings.items():
            optimized = self.string_to_param_dict[key]
            loss = loss + ((optimized - coarse.to(optimized.device)) ** 2).sum() / len(self.initial_embeddings)
        return loss

    # ------------------------------------------------------------------ files
    def save(self, ckpt_path, step=None, name=None, fmt="official"):
        """Write the official format (plain tensors, loadable with torch.load(weights_only=True)), or another
        format of embedding_io.FORMATS (one concept for the one-concept formats)."""
        strings = list(self.string_to_param_dict)
        if self.string_to_token_sequence:
            raise ValueError(
                f"{', '.join(map(repr, self.string_to_token_sequence))}: several tokens each, which the official "
                "format (one token id per placeholder) cannot store; save such a concept with "
                "scripts/convert_embedding.py --to a1111 from the file it came from.")
        return save_embedding_file(
            ckpt_path, vectors={s: p.detach() for s, p in self.string_to_param_dict.items()},
            tokens={s: int(t) for s, t in self.string_to_token_dict.items()},
            name=name or ",".join(strings), step=step, fmt=fmt)

    def load(self, ckpt_paths, placeholder_strings=None):
        """Add (or replace) the concepts of one or several embedding files of any supported format.

        Each concept keeps the vector count of its file and answers to the word its own tools use (an
        AUTOMATIC1111 .pt/.safetensors file to its file name, see ldm.modules.embedding_io), which may be
        several tokens. `placeholder_strings` renames the loaded concepts, in order. Files of another model
        family, and two loaded concepts a prompt could not tell apart, are refused; a concept named by an
        ordinary word gets a warning (unless named by `placeholder_strings`), since that word now means the concept.
        Returns (word, file, number of vectors) for each loaded concept.
        """
        paths = [ckpt_paths] if isinstance(ckpt_paths, (str, os.PathLike)) else list(ckpt_paths)
        loaded = [(path, name, vectors) for path in paths
                  for name, vectors in load_embedding_file(path, target_widths=(self.token_dim,)).vectors.items()]
        return self.add_concepts(loaded, placeholder_strings)

    def add_concepts(self, loaded, placeholder_strings=None, warn=True):
        """Add (or replace) concepts given as (file, name, vectors [n, d]); see `load`. warn=False skips the
        ordinary-word warning (a MultiEmbeddingManager warns once, not once per encoder)."""
        if placeholder_strings is not None:
            placeholder_strings = [placeholder_strings] if isinstance(placeholder_strings, str) else placeholder_strings
            if len(placeholder_strings) != len(loaded):
                raise ValueError(
                    f"placeholder_strings has {len(placeholder_strings)} entries but the files hold {len(loaded)} "
                    f"concepts ({', '.join(name for _, name, _ in loaded)}); give one string per concept.")
        strings = [placeholder_strings[i] if placeholder_strings is not None else name
                   for i, (_, name, _) in enumerate(loaded)]
        self._check_new_names(list(zip(strings, (path for path, _, _ in loaded))),
                              named_by_user=placeholder_strings is not None or not warn)
        for string, (path, name, vectors) in zip(strings, loaded):
            ids = self._token_ids_of(string)
            if not ids:
                raise ValueError(f"{path}: the concept name {string!r} has no tokens for this text encoder's "
                                 "tokenizer; give it a name with --placeholder_string.")
            # The regulariser's target only makes sense for vectors of the shape it was made for.
            initial = self.initial_embeddings[string] if string in self.initial_embeddings else None
            if initial is not None and initial.shape[-2:] != vectors.shape[-2:]:
                del self.initial_embeddings[string]
            self._set_placeholder(string, ids, vectors)
        return [(string, path, vectors.shape[-2]) for string, (path, _, vectors) in zip(strings, loaded)]

    def _check_new_names(self, named_paths, named_by_user):
        """Refuse two loaded concepts a prompt cannot tell apart; warn about names taken from the files that are
        ordinary words (a name the user gave was chosen knowingly)."""
        seen = {}
        for string, path in named_paths:
            ids = tuple(self._token_ids_of(string))
            if ids in seen:
                other_string, other_path = seen[ids]
                raise ValueError(
                    f"{path} and {other_path} both answer to {string!r}" + (
                        "" if string == other_string else f" / {other_string!r} (the same tokens)") +
                    ": a prompt could not tell them apart. Rename one with --placeholder_string (one string per "
                    "loaded concept, in order).")
            seen[ids] = (string, path)
            if not named_by_user and len(ids) == 1 and string.strip().isalpha():
                warnings.warn(f"The embedding {string!r} from {path} is named by an ordinary word of the "
                              f"tokenizer: {string!r} in a prompt now means this concept, not the word. Rename it "
                              "with --placeholder_string if you want the word.", stacklevel=3)


class MultiEmbeddingManager(nn.Module):
    """Textual inversion for a model with several text encoders (SDXL): one EmbeddingManager per encoder.

    Each placeholder gets one vector set per encoder (SDXL: 768 wide for CLIP-L "clip_l", 1280 for OpenCLIP
    bigG "clip_g"), each initialised from the init word in that encoder's own token-embedding table.

    Why a ModuleDict of EmbeddingManagers, keyed by `embedding_key(encoder)`, and not a wider EmbeddingManager:
    each encoder has its own width, token-embedding table, pad id and forward, and calls its manager with its own
    token ids; one unchanged EmbeddingManager per encoder reuses all of its logic (splicing several vectors,
    progressive words, concepts of several tokens, loading files) as it is, so the one-encoder path of SD v1,
    SD 2.x and LDM is untouched, the original's `string_to_param_dict` and file format included. This class only
    fans out construction, the training helpers and the files. Parameters: `managers.clip_l.string_to_param_dict.*`.

    The text encoders take `manager_for(encoder)` as their `embedding_manager` (GeneralConditioner does so).
    Other arguments as EmbeddingManager's.
    """

    per_layer = False

    def __init__(self, embedders, placeholder_strings=None, initializer_words=None, per_image_tokens=False,
                 num_vectors_per_token=1, progressive_words=False, **kwargs):
        super().__init__()
        keys = tuple(embedding_key(embedder) for embedder in embedders)
        if keys != ENCODER_KEYS:
            raise ValueError(f"MultiEmbeddingManager: the text encoders' embedding keys are "
                             f"{', '.join(map(str, keys))}; embedding files know the encoders "
                             f"{', '.join(ENCODER_KEYS)}, in that order (SDXL's). A one-encoder model uses "
                             "EmbeddingManager.")
        self.managers = nn.ModuleDict({key: EmbeddingManager(
            embedder, placeholder_strings=placeholder_strings, initializer_words=initializer_words,
            per_image_tokens=per_image_tokens, num_vectors_per_token=num_vectors_per_token,
            progressive_words=progressive_words, **kwargs) for key, embedder in zip(keys, embedders)})

    def manager_for(self, encoder):
        return self.managers[embedding_key(encoder)]

    def encode_tokens(self, encoder, tokens):
        return self.manager_for(encoder).encode_tokens(encoder, tokens)

    @property
    def concepts(self):
        return next(iter(self.managers.values())).concepts

    def interchange_format(self):
        """One concept: also the {"clip_l", "clip_g"} file AUTOMATIC1111, kohya and diffusers read."""
        return "a1111-safetensors" if len(self.concepts) == 1 else None

    def names_lost_in(self, text):
        """As EmbeddingManager.names_lost_in, over every encoder's tokenizer (a concept lost to either is lost)."""
        lost = [name for manager in self.managers.values() for name in manager.names_lost_in(text)]
        return list(dict.fromkeys(lost))

    @property
    def widths(self):
        return tuple(manager.token_dim for manager in self.managers.values())

    @property
    def progressive_step(self):
        return next(iter(self.managers.values())).progressive_step

    @progressive_step.setter
    def progressive_step(self, step):
        for manager in self.managers.values():
            manager.progressive_step = step

    # ------------------------------------------------------------------ training helpers
    def embedding_parameters(self):
        return (param for manager in self.managers.values() for param in manager.embedding_parameters())

    def embedding_to_coarse_loss(self):
        """The sum over encoders of each encoder's regulariser (EmbeddingManager.embedding_to_coarse_loss)."""
        return sum(manager.embedding_to_coarse_loss() for manager in self.managers.values())

    # ------------------------------------------------------------------ files
    def save(self, ckpt_path, step=None, name=None, fmt="official"):
        """Write every concept, one vector set per encoder: "official" is the project's multi-concept SDXL
        layout; "a1111-safetensors"/"kohya" (one concept) is what AUTOMATIC1111, kohya and diffusers read."""
        first = next(iter(self.managers.values()))
        if first.string_to_token_sequence:
            raise ValueError(
                f"{', '.join(map(repr, first.string_to_token_sequence))}: several tokens each, which the official "
                "format (one token id per placeholder) cannot store; save such a concept with "
                "scripts/convert_embedding.py --to a1111-safetensors from the file it came from.")
        vectors = {key: {s: p.detach() for s, p in manager.string_to_param_dict.items()}
                   for key, manager in self.managers.items()}
        tokens = {s: int(t) for s, t in first.string_to_token_dict.items()}
        return save_embedding_file(ckpt_path, vectors, tokens=tokens, name=name or ",".join(first.string_to_param_dict),
                                   step=step, fmt=fmt)

    def load(self, ckpt_paths, placeholder_strings=None):
        """Add (or replace) the concepts of SDXL embedding files (any layout embedding_io reads), each encoder's
        vectors into its manager; files of another family are refused naming both. Returns what
        EmbeddingManager.load returns."""
        paths = [ckpt_paths] if isinstance(ckpt_paths, (str, os.PathLike)) else list(ckpt_paths)
        files = [(path, load_embedding_file(path, target_widths=self.widths)) for path in paths]
        result = None
        for index, (key, manager) in enumerate(self.managers.items()):
            loaded = [(path, name, vectors) for path, emb in files for name, vectors in emb.by_encoder[key].items()]
            result = manager.add_concepts(loaded, placeholder_strings, warn=index == 0)
        return result
