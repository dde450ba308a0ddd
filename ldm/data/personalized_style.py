"""Textual inversion of a style: the same folder dataset, with captions such as
"a painting in the style of {placeholder}"."""
# The style templates live in ldm.data.personalized (its learnable_property: style uses them too).
from ldm.data.personalized import PersonalizedBase as _ObjectDataset
from ldm.data.personalized import imagenet_dual_style_templates_small, imagenet_style_templates_small

# The original module exposed its style templates under the object templates' names.
imagenet_templates_small = imagenet_style_templates_small
imagenet_dual_templates_small = imagenet_dual_style_templates_small


class PersonalizedBase(_ObjectDataset):
    """Same constructor and output as ldm.data.personalized.PersonalizedBase, style captions."""

    templates = imagenet_style_templates_small
    dual_templates = imagenet_dual_style_templates_small
