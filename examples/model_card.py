from nesso_mlx import load, generate

model_id = "mlx-community/nesso-0.4B-agentic-mlx"
model, tokenizer = load(model_id)
system_prompt = (
    "Sei un assistente che può usare strumenti.\n"
    "Quando servono informazioni esterne, chiama una funzione.\n"
    "Usa ESATTAMENTE il formato previsto."
)
messages = [
    {"role": "system", "content": system_prompt},
    {"role": "user", "content": "Che tempo fa a Milano?"}
]
prompt = tokenizer.apply_chat_template(
    messages, tokenize=False, add_generation_prompt=True
)
response = generate(model, tokenizer, prompt=prompt, verbose=True, temp=0.3, max_tokens=256)
print(response)
