#pragma once
// The tokenizer and the chat template that come with a checkpoint: a GGUF file's metadata,
// or tokenizer.json / tokenizer_config.json beside a Hugging Face folder's config.json.
#include <string>

#include "multipole/tokenizer/tokenizer.hpp"

namespace multipole {

class GGUFFile;

// model_path: what Model::load was given (a .gguf file, a folder, or a file in the folder);
// gguf: the open GGUF file when it is one (Model::gguf()), else nullptr. Throws "missing
// tokenizer" naming the file or folder when there is none.
Tokenizer checkpoint_tokenizer(const std::string& model_path, const GGUFFile* gguf);
// The Jinja chat template text (GGUF tokenizer.chat_template or tokenizer_config.json's
// chat_template), or "" when the checkpoint has none.
std::string checkpoint_chat_template(const std::string& model_path, const GGUFFile* gguf);

}  // namespace multipole
