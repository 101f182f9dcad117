"""What a file-backed SQLite database can do, for SQLAlchemy's dialect suite.

SuiteRequirements assumes little of a database: most requirements are closed
until a dialect's requirements class opens them. SQLAlchemy states SQLite's
in its own test/requirements.py (DefaultRequirements: in its source
repository, not in the wheel). This class says, requirement by requirement,
what DefaultRequirements says for SQLite where that differs from
SuiteRequirements, for a file database (sqlite:///file, not :memory:), with
SQLAlchemy's reasons. Requirements left out are SuiteRequirements' own, and
SuiteRequirements already asks the dialect where that is the question (e.g.
RETURNING, rowcount, server-side cursors). Two differ from SQLAlchemy's file
on purpose: reflect_table_options (below), and
emulated_lastrowid_even_with_sequences, left closed: it is about sequences,
which SQLite has not, and the suite does not consult it.

One class serves every SQLite driver run through the suite, the stock
pysqlite and aiosqlite and lite's lite and aiolite, so that their runs
compare. So where SQLAlchemy names a driver (its aiosqlite exclusions), the
rule here names what that driver is, an asyncio one; and where it lists the
stock drivers as having the DBAPI's cursor.lastrowid, the rule here is all
SQLite drivers: every SQLite DBAPI has it.
"""

from sqlalchemy import exc
from sqlalchemy.engine.default import DefaultDialect
from sqlalchemy.testing import exclusions
from sqlalchemy.testing.exclusions import against, fails_if, only_if, only_on, skip_if
from sqlalchemy.testing.requirements import SuiteRequirements


def _yes():
    """A requirement SQLite meets."""
    return property(lambda self: exclusions.open())


def _since(version):
    """A requirement SQLite meets from `version` on."""
    return property(lambda self: only_on(f"sqlite >= {version}"))


def _no(reason):
    """A requirement SQLite does not meet: its tests are skipped."""
    return property(lambda self: exclusions.closed(reason))


def _fails(reason):
    """A requirement SQLite does not meet whose tests run, expected to fail."""
    return property(lambda self: exclusions.fails(reason))


def _implements(config, method):
    """The dialect has `method`, not DefaultDialect's NotImplementedError."""
    return getattr(type(config.db.dialect), method) is not getattr(DefaultDialect, method)


def _is_async(config):
    return config.db.dialect.is_async


def _sqlite_json(config):
    """The JSON functions are there (built in from 3.38; before, an extension)."""
    if not against(config, "sqlite >= 3.9"):
        return False
    with config.db.connect() as conn:
        try:
            return (
                conn.exec_driver_sql(
                    """select json_extract('{"foo": "bar"}', '$."foo"')"""
                ).scalar()
                == "bar"
            )
        except exc.DBAPIError:
            return False


class Requirements(SuiteRequirements):
    # -- SQL ----------------------------------------------------------------
    boolean_col_expressions = _yes()
    ctes = _since("3.8.3")
    ctes_with_values = _since("3.8.3")
    except_ = _yes()
    intersect = _yes()
    fetch_expression = _yes()
    fetch_offset_with_options = _yes()
    mod_operator_as_percent_sign = _yes()
    order_by_label_with_expression = _yes()
    regexp_match = _yes()  # SQLAlchemy registers a REGEXP function on each connection
    supports_bitwise_and = _yes()
    supports_bitwise_not = _yes()
    supports_bitwise_or = _yes()
    supports_bitwise_shift = _yes()
    supports_bitwise_xor = _yes()
    tuple_in = _since("3.15.0")
    tuple_in_w_empty = _since("3.15.0")
    update_from = _since("3.33.0")
    window_functions = _since("3.25.0")
    window_range = _yes()
    window_range_numeric = _yes()
    nested_aggregates = _no("not supported by database")
    parens_in_union_contained_select_w_limit_offset = _fails(
        "SQLite: no parenthesized SELECT with LIMIT/OFFSET in a UNION"
    )
    parens_in_union_contained_select_wo_limit_offset = _fails(
        "SQLite: no parenthesized SELECT in a UNION"
    )

    @property
    def nullsordering(self):
        return fails_if("sqlite < 3.30.0", "NULLS FIRST / LAST came in SQLite 3.30")

    # -- DDL and schema objects ---------------------------------------------
    create_table_as = _yes()
    create_temp_table_as = _yes()
    table_ddl_if_exists = _yes()
    index_ddl_if_exists = _yes()
    indexes_with_expressions = _since("3.9.0")
    computed_columns = _since("3.31")
    computed_columns_stored = _since("3.31")
    computed_columns_virtual = _since("3.31")
    computed_columns_reflect_persisted = _since("3.31")
    server_defaults = _yes()
    expression_server_defaults = _yes()
    views = _yes()
    unicode_ddl = _yes()
    percent_schema_names = _yes()
    implicitly_named_constraints = _no("not supported by database")
    # Not enforced unless PRAGMA foreign_keys=ON, which is off by default.
    foreign_keys = _no("not supported by database")
    on_update_cascade = _no("target backend doesn't support ON UPDATE CASCADE")
    non_updating_cascade = _yes()
    repeated_column_foreign_keys = _yes()

    # SQLAlchemy's rule for a file database: its temporary-table fixtures
    # assume the single connection of a :memory: database's pool (a temporary
    # table is seen by its own connection only). Opened, some 750 tests error.
    temporary_tables = _no("not supported on a file database")
    temp_table_reflection = _no("not supported on a file database")
    temp_table_reflect_indexes = _no("not supported on a file database")

    # -- reflection -----------------------------------------------------------
    check_constraint_reflection = _yes()
    inline_check_constraint_reflection = _yes()
    foreign_key_constraint_name_reflection = _yes()
    foreign_key_constraint_option_reflection_ondelete = _yes()
    foreign_key_constraint_option_reflection_onupdate = _yes()
    fk_constraint_option_reflection_ondelete_noaction = _yes()
    fk_constraint_option_reflection_ondelete_restrict = _yes()
    fk_constraint_option_reflection_onupdate_restrict = _yes()
    indexes_check_column_order = _yes()
    reflects_pk_names = _yes()

    @property
    def reflect_table_options(self):
        # SQLAlchemy 2.1's SQLite dialect reflects WITHOUT ROWID and STRICT;
        # its test/requirements.py (seen at its main of 2026-08) still lists
        # only MySQL, MariaDB, Oracle and PostgreSQL, all earlier dialects did.
        return only_if(
            lambda config: _implements(config, "get_table_options"),
            "the dialect does not reflect table options",
        )

    view_column_reflection = _yes()
    view_reflection = _yes()

    # -- types ----------------------------------------------------------------
    date_historic = _yes()
    datetime_historic = _yes()
    datetime_literals = _yes()
    float_or_double_precision_behaves_generically = _yes()
    infinity_floats = _yes()
    nvarchar_types = _yes()
    precision_numerics_enotation_small = _yes()
    precision_numerics_retains_significant_digits = _yes()
    precision_numerics_many_significant_digits = _fails("SQLite numeric limitation")
    cast_precision_numerics_many_significant_digits = _fails("SQLite numeric limitation")
    numeric_received_as_decimal_untyped = _fails(
        "sqlite doesn't return Decimal objects without special handlers"
    )
    # https://bugs.python.org/issue38749
    json_index_supplementary_unicode_element = _no("sqlite3 module's JSON surrogate pairs")

    @property
    def json_type(self):
        return only_on(_sqlite_json, "no JSON functions in this SQLite")

    @property
    def legacy_unconditional_json_extract(self):
        return self.json_type

    def get_order_by_collation(self, config):
        return "NOCASE"

    # -- the driver -------------------------------------------------------------
    dbapi_lastrowid = _yes()
    emulated_lastrowid = _yes()

    @property
    def isolation_level(self):
        return exclusions.open()

    @property
    def autocommit(self):
        return self.isolation_level + only_if(
            lambda config: "AUTOCOMMIT" in self.get_isolation_levels(config)["supported"]
        )

    skip_autocommit_rollback = _yes()

    @property
    def async_dialect(self):
        return self.asyncio + only_if(_is_async, "Async dialect required")

    # SQLAlchemy: "**do not** let any sqlite driver run 'independent
    # connection' tests"; the read-only ones, yes, on a file database, except
    # with aiosqlite.
    independent_connections = _no("not with SQLite")

    @property
    def independent_readonly_connections(self):
        return skip_if(_is_async, "not with an asyncio SQLite driver")

    @property
    def predictable_gc(self):
        return self.cpython + self.gil_enabled + skip_if(_is_async, "asyncio SQLite driver")
