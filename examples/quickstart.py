import fabrica

app = fabrica.Fabrica(data_dir="./quickstart-data")

@app.register("Greeting")
def reconcile(ctx, obj):
    obj.status["message"] = "Hello, " + obj.spec.get("to", "world")
    obj.set_condition("Ready", True, reason="Greeted")

if __name__ == "__main__":
    app.serve(port=8080)
