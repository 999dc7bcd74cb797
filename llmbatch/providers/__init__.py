"""Provider adapters: each translates one provider's SDK and errors into llmbatch's terms."""
