"""Textual inversion's learned words.

The EmbeddingManager owns one small matrix of vectors per placeholder string (such as "*") and, called by the
text encoder right after its token-embedding lookup, swaps the placeholder's embedding for those vectors.
Only these vectors are trained; the text encoder and the diffusion model stay frozen.
"""
import os

import torch
from torch import nn

DEFAULT_PLACEHOLDER_TOKEN = ["*"]

# With progressive_words, one more vector of each placeholder becomes active every PROGRESSIVE_SCALE steps.
PROGRESSIVE_SCALE = 2000


class EmbeddingManager(nn.Module):
    """Learned embedding vectors for placeholder strings.

    embedder: a text encoder of ldm.modules.encoders.modules (FrozenCLIPEmbedder or BERTEmbedder).
    placeholder_strings: strings that must each be exactly one token for the embedder's tokenizer.
    initializer_words: the i-th placeholder starts from the token embedding(s) of the i-th word. A word of k tokens
        needs num_vectors_per_token >= k: vector j < k starts from the j-th token, the remaining vectors from
        the mean of the k token embeddings. Without a word the vectors start uniform in [0, 1) like the original.
    per_image_tokens: also add the original's per-image placeholders (ldm.data.personalized.per_img_token_list).
    progressive_words: activate the vectors one at a time, one more every PROGRESSIVE_SCALE optimizer steps,
        counted by `progressive_step`, which the training loop sets to the global step.
    """

    def __init__(self, embedder, placeholder_strings=None, initializer_words=None, per_image_tokens=False,
                 num_vectors_per_token=1, progressive_words=False):
        super().__init__()
        # A bound method, not a submodule: the embedder's weights belong to the text encoder, not to us.
        self._token_ids_of = embedder.string_to_token_ids
        self.token_dim = embedder.embedding_dim
        self.string_to_token_dict = {}
        self.string_to_param_dict = nn.ParameterDict()
        self.initial_embeddings = nn.ParameterDict()  # fixed targets of the regulariser, never optimized
        self.progressive_words = progressive_words
        self.progressive_step = None
        self.register_buffer("_placeholder_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("_vector_counts", torch.zeros(0, dtype=torch.long), persistent=False)

        placeholder_strings = list(placeholder_strings or DEFAULT_PLACEHOLDER_TOKEN)
        num_given = len(placeholder_strings)
        if per_image_tokens:
            from ldm.data.personalized import per_img_token_list
            placeholder_strings += per_img_token_list
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
        ids = self._token_ids_of(string)
        if len(ids) != 1:
            raise ValueError(
                f"The {origin} {string!r} is {len(ids)} tokens for this text encoder's tokenizer, but a placeholder "
                "must be exactly one token. Choose another string (for CLIP, '*' or a rare word such as 'sks').")
        return ids[0]

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

    def _set_placeholder(self, string, token, vectors):
        """Add or replace the vectors of `string` (token id `token`)."""
        clash = [s for s, t in self.string_to_token_dict.items() if s != string and int(t) == token]
        if clash:
            raise ValueError(f"Placeholder {string!r} is the same token as placeholder {clash[0]!r}; use another string.")
        device = self._placeholder_ids.device
        self.string_to_token_dict[string] = torch.tensor(token)
        self.string_to_param_dict[string] = nn.Parameter(vectors.float().to(device), requires_grad=True)
        self._placeholder_ids = torch.tensor([int(t) for t in self.string_to_token_dict.values()], device=device)
        self._vector_counts = torch.tensor([p.shape[0] for p in self.string_to_param_dict.values()], device=device)

    @property
    def max_vectors_per_token(self):
        return max((p.shape[0] for p in self.string_to_param_dict.values()), default=1)

    def num_active_vectors(self):
        """How many vectors per placeholder are in use now (progressive_words limits it)."""
        if self.progressive_words and self.progressive_step is not None:
            return min(self.progressive_step // PROGRESSIVE_SCALE + 1, self.max_vectors_per_token)
        return self.max_vectors_per_token

    # ------------------------------------------------------------------ forward
    def forward(self, tokenized_text, embedded_text):
        """Embeddings (b, n, d) of `tokenized_text` (b, n) with every placeholder replaced by its vectors.

        A placeholder with several vectors takes several positions: the following tokens shift right and the
        row is cut back to n. A row that overflows keeps its last token (end/pad), as the tokenizer's truncation
        does.
        """
        if not self.string_to_param_dict:
            return embedded_text
        # (b, n, P): which placeholder, if any, each token is; placeholder token ids are distinct.
        matches = tokenized_text.unsqueeze(-1) == self._placeholder_ids
        active = self.num_active_vectors()
        if active == 1:
            table = torch.stack([p[0] for p in self.string_to_param_dict.values()]).to(embedded_text.dtype)
            which = matches.long().argmax(dim=-1)
            return torch.where(matches.any(dim=-1, keepdim=True), table[which], embedded_text)
        return self._splice(matches, embedded_text, active)

    def _splice(self, matches, embedded_text, active):
        b, n, d = embedded_text.shape
        params = list(self.string_to_param_dict.values())
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

    # ------------------------------------------------------------------ training helpers
    def embedding_parameters(self):
        return self.string_to_param_dict.parameters()

    def get_embedding_norms_squared(self):
        all_params = torch.cat(list(self.string_to_param_dict.values()), dim=0)  # (total vectors, d)
        return (all_params * all_params).sum(dim=-1)

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
    def save(self, ckpt_path, step=None, name=None):
        """Write the official format (plain tensors, loadable with torch.load(weights_only=True))."""
        from ldm.modules.embedding_io import save_embedding_file
        strings = list(self.string_to_param_dict)
        return save_embedding_file(
            ckpt_path, vectors={s: p.detach() for s, p in self.string_to_param_dict.items()},
            tokens={s: int(t) for s, t in self.string_to_token_dict.items()},
            name=name or ",".join(strings), step=step, fmt="official")

    def load(self, ckpt_paths, placeholder_strings=None):
        """Add (or replace) the concepts of one or several embedding files of any supported format.

        Each concept keeps the vector count of its file. `placeholder_strings` renames the loaded concepts, in
        order, e.g. to use a diffusers "<cat-toy>" or an AUTOMATIC1111 name as a one-token string such as "*".
        """
        from ldm.modules.embedding_io import load_embedding_file
        paths = [ckpt_paths] if isinstance(ckpt_paths, (str, os.PathLike)) else list(ckpt_paths)
        loaded = [(path, name, vectors) for path in paths for name, vectors in load_embedding_file(path).vectors.items()]
        if placeholder_strings is not None:
            placeholder_strings = [placeholder_strings] if isinstance(placeholder_strings, str) else placeholder_strings
            if len(placeholder_strings) != len(loaded):
                raise ValueError(
                    f"placeholder_strings has {len(placeholder_strings)} entries but the files hold {len(loaded)} "
                    f"concepts ({', '.join(name for _, name, _ in loaded)}); give one string per concept.")
        for i, (path, name, vectors) in enumerate(loaded):
            string = placeholder_strings[i] if placeholder_strings is not None else name
            if vectors.shape[-1] != self.token_dim:
                raise ValueError(
                    f"{path}: the vectors of {name!r} are {vectors.shape[-1]} wide but this text encoder's token "
                    f"embeddings are {self.token_dim} wide: the file was made for another model.")
            ids = self._token_ids_of(string)
            if len(ids) != 1:
                raise ValueError(
                    f"{path}: the concept name {string!r} is {len(ids)} tokens for this text encoder's tokenizer, "
                    "but a placeholder must be exactly one token. Map it to a one-token string with "
                    "load(paths, placeholder_strings=['*']) (one string per loaded concept, in order), "
                    "or --placeholder_string on the command line.")
            # The regulariser's target only makes sense for vectors of the shape it was made for.
            initial = self.initial_embeddings[string] if string in self.initial_embeddings else None
            if initial is not None and initial.shape != vectors.shape:
                del self.initial_embeddings[string]
            self._set_placeholder(string, ids[0], vectors)
