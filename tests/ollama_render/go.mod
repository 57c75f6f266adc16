module posttrain/ollamarender

go 1.19
