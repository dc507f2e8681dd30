"""ldfleet: input-conditioned layer dropping for speech encoders, fine-tuned across device fleets.

The package is split by side: ``ldfleet.common`` (contracts and model core), ``ldfleet.client``
(device side), ``ldfleet.server`` (fleet side), ``ldfleet.simulations`` (fleets on one machine),
and this top level, which is only the command-line face.
"""

__version__ = "0.1.0"
