"""CatalogService (proto/crm/sales/v1/catalog.proto): product lines, products, price lists,
prices, pipelines and stages. The use cases live in catalog_products.py and
catalog_pipelines.py; this module is the servicer and what other parts of sales-svc call:

- `price_for(conn, product_id, quantity, price_list_id=None, on=None)` ->
  (unit_price, discount_percent, currency, tax_rate), and `line_amounts(...)` for a line's
  gross, discount, net, tax and total, rounded as GetPrice rounds them;
- `pipeline_for(conn, product_id=None, product_line_id=None)` -> pipeline id, and
  `first_stage(conn, pipeline_id)` -> (stage id, default probability);
- `OPPORTUNITY_FIELDS`: the field names a stage's required_fields may hold.
"""

from __future__ import annotations

from crm.sales.v1 import catalog_pb2 as pb
from crm.sales.v1 import catalog_pb2_grpc
from crm_chassis.grpc_server import Registration
from crm_chassis.interceptors import current_principal
from crm_chassis.pagination import PageTokens

from .catalog_pipelines import OPPORTUNITY_FIELDS, Pipelines, first_stage, pipeline_for, resolve
from .catalog_products import DEFAULT_TAX_RATE, LineAmounts, ProductCatalog, line_amounts, price_for, pricing
from .runtime import Sales

__all__ = [
    "DEFAULT_TAX_RATE",
    "OPPORTUNITY_FIELDS",
    "LineAmounts",
    "first_stage",
    "line_amounts",
    "pipeline_for",
    "price_for",
    "pricing",
    "registration",
    "resolve",
]


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    def __init__(self, sales: Sales):
        tokens = PageTokens(sales.ctx.settings.jwt_secret, "sales-catalog")
        self.products = ProductCatalog(sales, tokens)
        self.pipelines = Pipelines(sales, tokens)

    # product lines
    def CreateProductLine(self, request, context):
        return self.products.create_product_line(request.product_line, request.request_id, current_principal())

    def GetProductLine(self, request, context):
        return self.products.get_product_line(request.name)

    def ListProductLines(self, request, context):
        return self.products.list_product_lines(request)

    def UpdateProductLine(self, request, context):
        return self.products.update_product_line(request.product_line, request.update_mask, current_principal())

    def DeleteProductLine(self, request, context):
        self.products.delete_product_line(request.name, request.etag, current_principal())
        return pb.DeleteProductLineResponse(name=request.name)

    # products
    def CreateProduct(self, request, context):
        return self.products.create_product(request.product, request.request_id, current_principal())

    def GetProduct(self, request, context):
        return self.products.get_product(request.name)

    def ListProducts(self, request, context):
        return self.products.list_products(request)

    def UpdateProduct(self, request, context):
        return self.products.update_product(request.product, request.update_mask, current_principal())

    def DeleteProduct(self, request, context):
        self.products.delete_product(request.name, request.etag, current_principal())
        return pb.DeleteProductResponse(name=request.name)

    def GetPrice(self, request, context):
        return self.products.get_price(request)

    # price lists
    def CreatePriceList(self, request, context):
        return self.products.create_price_list(request.price_list, request.request_id, current_principal())

    def GetPriceList(self, request, context):
        return self.products.get_price_list(request.name)

    def ListPriceLists(self, request, context):
        return self.products.list_price_lists(request)

    def UpdatePriceList(self, request, context):
        return self.products.update_price_list(request.price_list, request.update_mask, current_principal())

    def DeletePriceList(self, request, context):
        self.products.delete_price_list(request.name, request.etag, current_principal())
        return pb.DeletePriceListResponse(name=request.name)

    def SetPriceListItems(self, request, context):
        return self.products.set_items(request, current_principal())

    def ListPriceListItems(self, request, context):
        return self.products.list_items(request)

    # pipelines
    def CreatePipeline(self, request, context):
        return self.pipelines.create(request.pipeline, request.request_id, current_principal())

    def GetPipeline(self, request, context):
        return self.pipelines.get(request.name)

    def ListPipelines(self, request, context):
        return self.pipelines.list(request)

    def UpdatePipeline(self, request, context):
        return self.pipelines.update(request.pipeline, request.update_mask, current_principal())

    def DeletePipeline(self, request, context):
        self.pipelines.delete(request.name, request.etag, current_principal())
        return pb.DeletePipelineResponse(name=request.name)

    def ResolvePipeline(self, request, context):
        return self.pipelines.resolve(request)


def registration(sales: Sales) -> Registration:
    return Registration.of(CatalogServicer(sales))
