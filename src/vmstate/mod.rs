//! VM descriptions and section codecs.
