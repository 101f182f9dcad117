from typing import ClassVar

from django.db import migrations, models


def add_counters(apps, schema_editor):
    counter = apps.get_model("django_counter", "Counter")
    counter.objects.bulk_create([counter(name="hits"), counter(name="misses")])


class Migration(migrations.Migration):
    initial = True
    dependencies: ClassVar[list[tuple[str, str]]] = []
    operations: ClassVar[list[migrations.operations.base.Operation]] = [
        migrations.CreateModel(
            name="Counter",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=64, unique=True)),
                ("value", models.BigIntegerField(default=0)),
            ],
        ),
        migrations.RunPython(add_counters, migrations.RunPython.noop),
    ]
